/* Virtqueue tests: descriptor layouts a real guest may use, and hostile
 * chains.  A malformed chain must cost the guest that one buffer (returned
 * with length 0), never the daemon, and the device must keep serving. */
#include "config.h"

#include <errno.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>

#include "log.h"
#include "util.h"
#include "vsock_testlib.h"

static struct host H;
static struct vd V;

static int setup(const struct vd_opts *o)
{
	int r = fixture_open(&H, &V, 0, o);

	H.accept_auto_read = true;
	return r;
}

static void teardown(void)
{
	fixture_close(&H, &V);
}

/* A fresh connection moves data both ways: the device still serves. */
static bool still_serving(uint32_t gport)
{
	/* static: the stream registry keeps a pointer to it past this call */
	static struct gstream g;
	struct hconn *hc;
	unsigned before = H.naccepted;

	gs_init(&g, gport, 1200, 65536);
	g.rx_seed = 4;
	H.accept_seed = 4;
	if (gs_connect(&V, &g) != 0)
		return false;
	if (!WAIT_FOR(&V, H.naccepted == before + 1, 1000))
		return false;
	hc = H.accepted[before];
	if (gs_send_data(&V, &g, 4, 100000, true) != 0)
		return false;
	if (!WAIT_FOR(&V, hc->rx_bytes == 100000, 2000) || hc->rx_bad)
		return false;
	big_lock();
	hc->tx_seed = 4;
	hc->tx_total = 100000;
	hconn_pump_tx(hc);
	big_unlock();
	for (int i = 0; i < 200 && g.rx_bytes < 100000; i++)
		gs_pump(&V, NULL, 0, 10, NULL);
	return g.rx_bytes == 100000 && !g.rx_bad;
}

static void layouts_with(const struct vd_opts *o)
{
	static const enum vd_layout lay[] = { VD_HDR_PAYLOAD, VD_ONE,      VD_SPLIT_HDR,
					      VD_SCATTER,     VD_INDIRECT, VD_STRADDLE };
	uint8_t buf[3000];
	struct gstream g;
	uint64_t off = 0;

	CHECK(setup(o) == 0);
	H.accept_seed = 9;
	gs_init(&g, 50000, 1024, 65536);
	CHECK_EQ(gs_connect(&V, &g), 0);
	CHECK(WAIT_FOR(&V, H.naccepted == 1, 1000));
	for (unsigned i = 0; i < ARRAY_SIZE(lay); i++) {
		struct virtio_vsock_hdr h;
		uint32_t len = 1000 + 300 * i;
		gen_fill(9, off, buf, len);
		vd_hdr(&V, &h, g.gport, g.hport, VIRTIO_VSOCK_OP_RW, len, g.buf_alloc, g.fwd_cnt);
		CHECK_EQ(vd_send(&V, &h, buf, len, lay[i]), 0);
		off += len;
		CHECK(WAIT_FOR(&V, H.accepted[0]->rx_bytes == off, 1000));
		CHECK(!H.accepted[0]->rx_bad);
	}
	/* header-only packets in each layout too (REQUEST/CREDIT etc.) */
	CHECK_EQ(gs_send_ctrl(&V, &g, VIRTIO_VSOCK_OP_CREDIT_REQUEST, 0), 0);
	struct vd_pkt p;
	CHECK_EQ(vd_recv(&V, &p, 1000), 0);
	CHECK_EQ(p.hdr.op, VIRTIO_VSOCK_OP_CREDIT_UPDATE);
	free(p.data);
	/* host -> guest into whatever rx layout this guest posts */
	g.rx_seed = 10;
	big_lock();
	H.accepted[0]->tx_seed = 10;
	H.accepted[0]->tx_total = 500000;
	hconn_pump_tx(H.accepted[0]);
	big_unlock();
	for (int i = 0; i < 300 && g.rx_bytes < 500000; i++)
		gs_pump(&V, NULL, 0, 10, NULL);
	CHECK_EQ(g.rx_bytes, 500000);
	CHECK(!g.rx_bad);
	teardown();
}

static void t_layouts_event_idx_indirect(void)
{
	struct vd_opts o = { .event_idx = true, .indirect = true, .reply_ack = true };
	layouts_with(&o);
}

/* Classic Linux rx: a header descriptor, then data; ours splits inside the
 * header, and small buffers force many packets. */
static void t_layouts_split_rx_small_buffers(void)
{
	struct vd_opts o = { .indirect = true, .rx_split = true, .rx_buf_size = 200, .qsize = 256 };
	layouts_with(&o);
}

static void t_layouts_big_rx_buffers(void)
{
	struct vd_opts o = { .event_idx = true, .indirect = true, .rx_buf_size = 65536 + 44,
			     .qsize = 64 };
	layouts_with(&o);
}

/* Post one hand-made chain and check it comes back with length 0. */
static bool post_bad(unsigned n, void (*fill)(struct vring_desc *d, uint16_t *ids, void *ctx),
		     void *ctx)
{
	uint16_t ids[64];
	struct vring_desc *d = V.tx.desc;

	if (vd_raw_alloc(&V, n, ids) < 0)
		return false;
	fill(d, ids, ctx);
	vd_raw_post(&V, ids[0]);
	for (int i = 0; i < 1000 && vd_tx_inflight(&V); i++)
		vd_poll(&V, 1);
	return vd_tx_inflight(&V) == 0;
}

static uint64_t hdr_gpa(void)
{
	/* a valid REQUEST header in scratch memory (to port 1300) */
	struct virtio_vsock_hdr h;
	vd_hdr(&V, &h, 51000, 1300, VIRTIO_VSOCK_OP_REQUEST, 0, 65536, 0);
	memcpy(vd_gpa(&V, V.scratch_gpa, sizeof(h)), &h, sizeof(h));
	return V.scratch_gpa;
}

static void set(struct vring_desc *d, uint64_t a, uint32_t l, uint16_t f, uint16_t n)
{
	d->addr = a;
	d->len = l;
	d->flags = f;
	d->next = n;
}

static void f_outside_ram(struct vring_desc *d, uint16_t *ids, void *ctx)
{
	set(&d[ids[0]], 0x1000, 44, 0, 0);
}
static void f_past_end(struct vring_desc *d, uint16_t *ids, void *ctx)
{
	set(&d[ids[0]], VD_GPA_BASE + V.ram_size - 20, 44, 0, 0);
}
static void f_len_overflow(struct vring_desc *d, uint16_t *ids, void *ctx)
{
	set(&d[ids[0]], hdr_gpa(), 0xffffffffu, 0, 0);
}
static void f_addr_wrap(struct vring_desc *d, uint16_t *ids, void *ctx)
{
	set(&d[ids[0]], UINT64_MAX - 10, 100, 0, 0);
}
static void f_loop2(struct vring_desc *d, uint16_t *ids, void *ctx)
{
	set(&d[ids[0]], hdr_gpa(), 20, VRING_DESC_F_NEXT, ids[1]);
	set(&d[ids[1]], hdr_gpa() + 20, 24, VRING_DESC_F_NEXT, ids[0]);
}
static void f_self_loop(struct vring_desc *d, uint16_t *ids, void *ctx)
{
	set(&d[ids[0]], hdr_gpa(), 44, VRING_DESC_F_NEXT, ids[0]);
}
static void f_next_out_of_range(struct vring_desc *d, uint16_t *ids, void *ctx)
{
	set(&d[ids[0]], hdr_gpa(), 44, VRING_DESC_F_NEXT, 5000);
}
static void f_short_header(struct vring_desc *d, uint16_t *ids, void *ctx)
{
	set(&d[ids[0]], hdr_gpa(), 20, 0, 0);
}
static void f_write_then_read(struct vring_desc *d, uint16_t *ids, void *ctx)
{
	set(&d[ids[0]], hdr_gpa(), 20, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, ids[1]);
	set(&d[ids[1]], hdr_gpa() + 20, 24, 0, 0);
}
/* indirect tables, in scratch memory after the header */
static struct vring_desc *itable(unsigned n)
{
	return vd_gpa(&V, V.scratch_gpa + 4096, 16ull * n);
}
static void f_ind_too_long(struct vring_desc *d, uint16_t *ids, void *ctx)
{
	struct vring_desc *t = itable(2048);
	for (unsigned i = 0; i < 2048; i++)
		set(&t[i], hdr_gpa(), 1, VRING_DESC_F_NEXT, (uint16_t)(i + 1));
	set(&d[ids[0]], V.scratch_gpa + 4096, 2048 * 16, VRING_DESC_F_INDIRECT, 0);
}
static void f_ind_loop(struct vring_desc *d, uint16_t *ids, void *ctx)
{
	struct vring_desc *t = itable(2);
	set(&t[0], hdr_gpa(), 20, VRING_DESC_F_NEXT, 1);
	set(&t[1], hdr_gpa() + 20, 24, VRING_DESC_F_NEXT, 0);
	set(&d[ids[0]], V.scratch_gpa + 4096, 32, VRING_DESC_F_INDIRECT, 0);
}
static void f_ind_nested(struct vring_desc *d, uint16_t *ids, void *ctx)
{
	struct vring_desc *t = itable(1);
	set(&t[0], V.scratch_gpa + 4096, 16, VRING_DESC_F_INDIRECT, 0);
	set(&d[ids[0]], V.scratch_gpa + 4096, 16, VRING_DESC_F_INDIRECT, 0);
}
static void f_ind_outside(struct vring_desc *d, uint16_t *ids, void *ctx)
{
	set(&d[ids[0]], 0x2000, 64, VRING_DESC_F_INDIRECT, 0);
}
static void f_ind_bad_len(struct vring_desc *d, uint16_t *ids, void *ctx)
{
	set(&d[ids[0]], V.scratch_gpa + 4096, 17, VRING_DESC_F_INDIRECT, 0);
}
static void f_ind_with_next(struct vring_desc *d, uint16_t *ids, void *ctx)
{
	struct vring_desc *t = itable(1);
	set(&t[0], hdr_gpa(), 44, 0, 0);
	set(&d[ids[0]], V.scratch_gpa + 4096, 16, VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT,
	    ids[1]);
	set(&d[ids[1]], hdr_gpa(), 44, 0, 0);
}
static void f_long_chain(struct vring_desc *d, uint16_t *ids, void *ctx)
{
	/* 64 one-byte descriptors: legal and long; must be accepted */
	for (unsigned i = 0; i < 64; i++)
		set(&d[ids[i]], hdr_gpa() + (i < 44 ? i : 43), i < 44 ? 1 : 0,
		    i + 1 < 64 ? VRING_DESC_F_NEXT : 0, i + 1 < 64 ? ids[i + 1] : 0);
}

static void t_malformed_chains(void)
{
	static const struct {
		const char *name;
		unsigned n;
		void (*fill)(struct vring_desc *, uint16_t *, void *);
	} cases[] = {
		{ "descriptor outside RAM", 1, f_outside_ram },
		{ "descriptor past the end of RAM", 1, f_past_end },
		{ "len 4 GiB", 1, f_len_overflow },
		{ "address wraps", 1, f_addr_wrap },
		{ "two-descriptor loop", 2, f_loop2 },
		{ "self loop", 1, f_self_loop },
		{ "next out of range", 1, f_next_out_of_range },
		{ "header shorter than 44 bytes", 1, f_short_header },
		{ "writable before readable", 2, f_write_then_read },
		{ "indirect table too long", 1, f_ind_too_long },
		{ "loop inside indirect table", 1, f_ind_loop },
		{ "nested indirect", 1, f_ind_nested },
		{ "indirect table outside RAM", 1, f_ind_outside },
		{ "indirect len not a multiple of 16", 1, f_ind_bad_len },
		{ "indirect with NEXT", 2, f_ind_with_next },
	};
	struct vd_opts o = { .event_idx = true, .indirect = true };

	CHECK(setup(&o) == 0);
	for (unsigned i = 0; i < ARRAY_SIZE(cases); i++) {
		unsigned accepted = H.naccepted;
		if (!post_bad(cases[i].n, cases[i].fill, NULL)) {
			fprintf(stderr, "  case '%s': chain not returned\n", cases[i].name);
			CHECK(0);
		}
		/* none of them may have connected anything */
		usleep(10000);
		CHECK_EQ(H.naccepted, accepted);
		if (!still_serving(52000 + i)) {
			fprintf(stderr, "  case '%s': device stopped serving\n", cases[i].name);
			CHECK(0);
		}
	}
	/* a legal but long chain (header over 44 descriptors) is accepted */
	unsigned before = H.naccepted;
	CHECK(post_bad(64, f_long_chain, NULL));
	CHECK(WAIT_FOR(&V, H.naccepted == before + 1, 1000));
	CHECK_EQ(H.accepted[before]->host_port, 1300);
	teardown();
}

/* Indirect descriptors when the feature was not negotiated: dropped. */
static void t_indirect_not_negotiated(void)
{
	struct vd_opts o = { .event_idx = true };

	CHECK(setup(&o) == 0);
	CHECK(post_bad(1, f_ind_loop, NULL)); /* any indirect chain */
	struct vring_desc *t = itable(1);
	set(&t[0], hdr_gpa(), 44, 0, 0);
	uint16_t ids[1];
	CHECK(vd_raw_alloc(&V, 1, ids) == 0);
	set(&V.tx.desc[ids[0]], V.scratch_gpa + 4096, 16, VRING_DESC_F_INDIRECT, 0);
	vd_raw_post(&V, ids[0]);
	CHECK(WAIT_FOR(&V, vd_tx_inflight(&V) == 0, 1000));
	CHECK_EQ(H.naccepted, 0);
	CHECK(still_serving(53000));
	teardown();
}

/* A corrupt avail ring (index racing ahead, head out of range) stops that
 * ring; the daemon survives and the next frontend is served. */
static void t_corrupt_avail_ring(void)
{
	struct vd_opts o = { .event_idx = true };
	uint64_t one = 1;

	CHECK(setup(&o) == 0);
	__atomic_store_n(&V.tx.avail->idx, (uint16_t)(V.tx.avail_idx + 1000), __ATOMIC_RELEASE);
	CHECK(write(V.tx.kickfd, &one, 8) == 8);
	usleep(50000);
	vd_close(&V);
	CHECK(vd_open(&V, H.path, &o) == 0);
	CHECK(still_serving(54000));
	/* head index out of range */
	V.tx.avail->ring[V.tx.avail_idx % V.tx.num] = 60000;
	V.tx.avail_idx++;
	__atomic_store_n(&V.tx.avail->idx, V.tx.avail_idx, __ATOMIC_RELEASE);
	CHECK(write(V.tx.kickfd, &one, 8) == 8);
	usleep(50000);
	vd_close(&V);
	CHECK(vd_open(&V, H.path, &o) == 0);
	CHECK(still_serving(54001));
	teardown();
}

/* The guest stops reading (no rx buffers) but keeps sending packets that
 * need answers: tx must keep draining, answers wait (bounded) for rx. */
static void t_tx_drains_while_rx_full(void)
{
	struct vd_opts o = { .event_idx = true, .qsize = 64 };
	struct virtio_vsock_hdr h;
	unsigned rst = 0;
	struct vd_pkt p;

	CHECK(setup(&o) == 0);
	/* use up every rx buffer with RSTs we do not read yet */
	for (unsigned i = 0; i < 2000; i++) {
		vd_hdr(&V, &h, 60000 + i, 7000, VIRTIO_VSOCK_OP_RW, 0, 65536, 0);
		/* vd_send waits for tx descriptors: it would time out if the
		 * device stopped consuming tx */
		CHECK_EQ(vd_send(&V, &h, NULL, 0, VD_ONE), 0);
	}
	while (vd_recv(&V, &p, 300) == 0) {
		rst += p.hdr.op == VIRTIO_VSOCK_OP_RST;
		free(p.data);
	}
	/* answers beyond the bounded queue may be dropped, never blocked on */
	CHECK(rst >= 64);
	CHECK(rst <= 2000);
	CHECK(still_serving(55000));
	teardown();
}

/* Rx buffers with room for a header only (a guest may post them): control
 * packets still go out in them, data waits, and the device does not spin
 * looking for a connection whose data fits (found by fuzz_vring_device). */
static void t_header_only_rx_buffers(void)
{
	struct vd_opts o = { .qsize = 16, .rx_buf_size = VD_HDR };
	struct gstream g;
	struct hconn *hc;
	uint8_t data[1000] = { 0 };
	unsigned before;

	CHECK(setup(&o) == 0);
	before = H.naccepted;
	gs_init(&g, 56000, 1300, 65536);
	CHECK_EQ(gs_connect(&V, &g), 0); /* RESPONSE fits */
	CHECK(WAIT_FOR(&V, H.naccepted == before + 1, 1000));
	hc = H.accepted[before];
	alarm(20); /* a spinning loop thread would hold the big lock for good */
	big_lock();
	CHECK_EQ(vsock_conn_write(hc->c, data, sizeof(data)), (long long)sizeof(data));
	big_unlock();
	/* the loop thread still answers: a credit request gets its update */
	g.peer_buf_alloc = 0;
	CHECK_EQ(gs_send_ctrl(&V, &g, VIRTIO_VSOCK_OP_CREDIT_REQUEST, 0), 0);
	gs_pump(&V, NULL, 0, 500, NULL);
	CHECK(g.peer_buf_alloc != 0);
	CHECK_EQ(g.rx_bytes, 0);
	big_lock();
	big_unlock();
	alarm(0);
	teardown();
}

int main(void)
{
	int fails = 0;

	signal(SIGPIPE, SIG_DFL);
	log_verbosity = getenv("VSOCK_DEBUG") ? LOG_DEBUG : LOG_ERR;
	fails += run_test("layouts_event_idx_indirect", t_layouts_event_idx_indirect);
	fails += run_test("layouts_split_rx_small_buffers", t_layouts_split_rx_small_buffers);
	fails += run_test("layouts_big_rx_buffers", t_layouts_big_rx_buffers);
	fails += run_test("malformed_chains", t_malformed_chains);
	fails += run_test("indirect_not_negotiated", t_indirect_not_negotiated);
	fails += run_test("corrupt_avail_ring", t_corrupt_avail_ring);
	fails += run_test("tx_drains_while_rx_full", t_tx_drains_while_rx_full);
	fails += run_test("header_only_rx_buffers", t_header_only_rx_buffers);
	fprintf(stderr, "%d failed\n", fails);
	return fails ? 1 : 0;
}
