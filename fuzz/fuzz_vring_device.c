/* A hostile guest driver against the real vsock device: it writes whatever
 * it likes into its descriptor tables, avail rings, indirect tables and
 * packet headers, kicks, reconfigures rings mid-stream, while the host side
 * reads, writes, shuts down, closes and dials connections.  The device is
 * set up over vhost-user exactly as QEMU does (fuzz_frontend.c) and runs on
 * a loop this thread drives, so a run is deterministic.
 *
 * Input: [cfg u8] then ops [op u8][args...] (see the switch below):
 *   cfg: bit0 EVENT_IDX, bit1 INDIRECT_DESC, bits2-5 ring size 2^(n%9),
 *        bit6 no protocol features.
 *
 * Checked beyond the sanitizers: every used element names a descriptor
 * inside the ring; a packet in an rx buffer the guest posted well-formed has
 * a sane header (host -> guest cids, length matching the used length, a
 * known op) and fits the buffer; after every op, each connection's window
 * lies between VSOCK_BUF_MIN and VSOCK_BUF_ALLOC, what it buffers fits what
 * it reserves, and the reservations add up to the device's rx_reserved; the
 * device never leaks a connection or an fd once the host closed everything
 * and the frontend went away. */
#include "config.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <linux/virtio_config.h>
#include <linux/virtio_ring.h>
#include <linux/virtio_vsock.h>

#include "fuzz_frontend.h"
#include "fuzz_input.h"
#include "util.h"
#include "vsock/vsock_int.h"

#define HDR ((uint32_t)sizeof(struct virtio_vsock_hdr))
#define RING_AREA 0x4000u  /* per ring: desc, avail, used at +0, +0x1000, +0x2000 */
#define TX_SLOTS 16
#define TX_SLOT 0x5000u    /* payload + header, indirect table at +0x4800 */
#define TX_BASE 0x8000u
#define RX_BASE 0x60000u
#define RX_SLOT 0x2000u
#define MAX_CONNS 64

static struct fe fe;

struct ring {
	unsigned num;
	struct vring_desc *desc;
	struct vring_avail *avail;
	struct vring_used *used;
	uint16_t avail_idx, last_used, next_desc;
	unsigned allocs; /* descriptors handed out since the ring started */
	/* rx: what we posted per head (well-formed buffers only) */
	uint32_t posted_len[256];
	bool tracking;
};
/* the guest wrote over its own used rings: their contents prove nothing */
static bool used_scribbled;

static struct ring rings[2];
static unsigned tx_slot;
static size_t dirty_lo, dirty_hi;

/* ---- host side ---- */

struct hc {
	struct vsock_conn *c;
	bool reader; /* reads everything at once, like a bridge to a fast socket */
	bool direct; /* takes part of each packet straight from guest memory */
};
static struct hc conns[MAX_CONNS];
static unsigned accepted;

static void hc_readable(struct vsock_conn *c, void *arg)
{
	struct hc *h = arg;
	uint8_t buf[8192];

	if (!h->reader)
		return;
	while (vsock_conn_read(c, buf, sizeof(buf)) > 0)
		;
}

static void hc_closed(struct vsock_conn *c, void *arg, int err)
{
	struct hc *h = arg;

	if (err != ECONNRESET && err != ECONNREFUSED && err != ETIMEDOUT && err != ENOMEM) {
		fprintf(stderr, "closed with unexpected error %d\n", err);
		abort();
	}
	vsock_conn_close(c);
	h->c = NULL;
}

/* Touches every byte it is offered (ASan checks the iovecs point into the
 * mapped guest memory) and takes the first half of them. */
static size_t hc_deliver(struct vsock_conn *c, void *arg, const struct iovec *iov, int cnt,
			 size_t len)
{
	struct hc *h = arg;
	volatile uint8_t sum = 0;
	size_t total = 0;

	if (!h->direct)
		return 0;
	for (int i = 0; i < cnt; i++) {
		const uint8_t *p = iov[i].iov_base;
		for (size_t k = 0; k < iov[i].iov_len; k++)
			sum += p[k];
		total += iov[i].iov_len;
	}
	if (total != len)
		abort(); /* the device described other bytes than it announced */
	return len / 2;
}

static const struct vsock_conn_ops hc_ops = {
	.readable = hc_readable,
	.closed = hc_closed,
	.deliver = hc_deliver,
};

static struct hc *hc_slot(void)
{
	for (unsigned i = 0; i < MAX_CONNS; i++)
		if (!conns[i].c)
			return &conns[i];
	return NULL;
}

static int on_accept(void *arg, struct vsock_conn *c, uint32_t host_port, uint32_t guest_port)
{
	struct hc *h = hc_slot();

	if (!h || host_port % 5 == 4)
		return -ECONNREFUSED;
	h->c = c;
	h->reader = host_port % 3 != 2;
	h->direct = host_port % 3 == 1;
	accepted++;
	vsock_conn_set_ops(c, &hc_ops, h);
	return 0;
}

/* ---- guest memory ---- */

static void mark(size_t off, size_t len)
{
	if (off < dirty_lo)
		dirty_lo = off;
	if (off + len > dirty_hi)
		dirty_hi = off + len;
}

static void *ram(uint64_t off, size_t len)
{
	mark(off, len);
	return fe.ram + off;
}

static uint64_t gpa_of(uint32_t a)
{
	switch (a >> 30) {
	case 0:
	case 1:
		return FE_GPA_BASE + (a & 0x1fffff);
	case 2:
		return FE_GPA_BASE + FE_RAM_SIZE - (a & 0xffff);
	default:
		return (a & 1) ? ~0ull - (a & 0xffff) : (uint64_t)(a & 0x3fffffff);
	}
}

static void set_desc(struct ring *r, unsigned i, uint64_t addr, uint32_t len, uint16_t flags,
		     uint16_t next)
{
	struct vring_desc *d = &r->desc[i % r->num];

	d->addr = addr;
	d->len = len;
	d->flags = flags;
	d->next = next;
}

static uint16_t alloc_desc(struct ring *r)
{
	uint16_t i = r->next_desc;

	r->next_desc = (uint16_t)((r->next_desc + 1) % r->num);
	/* past one lap a descriptor of a posted buffer may be rewritten before
	 * the device took it: stop checking rx contents against what we posted */
	if (++r->allocs > r->num)
		r->tracking = false;
	return i;
}

static void publish(struct ring *r, uint16_t head)
{
	r->avail->ring[r->avail_idx % r->num] = head;
	r->avail_idx++;
	__atomic_store_n(&r->avail->idx, r->avail_idx, __ATOMIC_RELEASE);
}

/* ---- checks ---- */

static void check_used(unsigned idx)
{
	struct ring *r = &rings[idx];
	uint16_t end = __atomic_load_n(&r->used->idx, __ATOMIC_ACQUIRE);

	while (r->last_used != end) {
		struct vring_used_elem e = r->used->ring[r->last_used % r->num];
		r->last_used++;
		if (e.id >= r->num && !used_scribbled) {
			fprintf(stderr, "ring %u: used id %u >= %u\n", idx, e.id, r->num);
			abort();
		}
		if (idx != 0 || !r->tracking || !r->posted_len[e.id] || e.len == 0)
			continue;
		struct virtio_vsock_hdr h;
		memcpy(&h, fe.ram + RX_BASE + (uint64_t)e.id % 32 * RX_SLOT, sizeof(h));
		if (e.len > r->posted_len[e.id] || e.len < HDR || h.src_cid != 2 ||
		    h.dst_cid != FE_GUEST_CID || h.len != e.len - HDR || h.op == 0 ||
		    h.op > VIRTIO_VSOCK_OP_CREDIT_REQUEST || (h.len && h.op != VIRTIO_VSOCK_OP_RW)) {
			fprintf(stderr, "rx packet: used len %u (posted %u), cids %llu->%llu, op %u, len %u\n",
				e.len, r->posted_len[e.id], (unsigned long long)h.src_cid,
				(unsigned long long)h.dst_cid, h.op, h.len);
			abort();
		}
		r->posted_len[e.id] = 0;
	}
}

/* The receive budget's books (conn.c, conn_sync_reserve). */
static void check_reserve(void)
{
	const struct vsock_dev *d = fe.dev;
	const struct list_node *n;
	uint64_t sum = 0;

	for (n = d->all.next; n != &d->all; n = n->next) {
		const struct vsock_conn *c = container_of(n, struct vsock_conn, all_node);
		uint32_t want = c->hashed ? c->buf_alloc : c->rx_bytes;

		if (c->buf_alloc < VSOCK_BUF_MIN || c->buf_alloc > VSOCK_BUF_ALLOC ||
		    c->rx_bytes > c->buf_alloc || c->reserved != want) {
			fprintf(stderr, "conn %u:%u: window %u, buffered %u, reserved %u (%s)\n",
				c->local_port, c->peer_port, c->buf_alloc, c->rx_bytes, c->reserved,
				c->hashed ? "hashed" : "unhashed");
			abort();
		}
		sum += c->reserved;
	}
	if (sum != d->rx_reserved) {
		fprintf(stderr, "rx_reserved %llu, connections reserve %llu\n",
			(unsigned long long)d->rx_reserved, (unsigned long long)sum);
		abort();
	}
}

static void kick(unsigned idx)
{
	fe_kick(&fe, idx);
	check_used(0);
	check_used(1);
}

/* ---- guest operations ---- */

static void op_pkt(struct fin *f)
{
	struct ring *r = &rings[1];
	struct virtio_vsock_hdr h = { 0 };
	uint8_t sel = fin_u8(f), ports = fin_u8(f), layout = fin_u8(f) % 6;
	uint16_t plen = fin_u16(f) % (TX_SLOT - 0x900 - HDR);
	uint64_t base = TX_BASE + (uint64_t)(tx_slot++ % TX_SLOTS) * TX_SLOT, gpa;
	uint16_t ids[40];
	unsigned n, i;

	h.src_cid = (sel & 1) ? fin_u64(f) : FE_GUEST_CID;
	h.dst_cid = (sel & 2) ? fin_u64(f) : 2;
	h.src_port = 1000 + (ports & 3);
	h.dst_port = (ports & 0x80) ? 49152 + ((ports >> 2) & 7) : 10 + ((ports >> 2) & 7);
	if (ports == 0xff)
		h.dst_port = fin_u32(f);
	h.op = fin_u8(f) % 9;
	h.type = (sel & 4) ? fin_u16(f) : VIRTIO_VSOCK_TYPE_STREAM;
	h.flags = (sel & 8) ? fin_u32(f) : (sel >> 6);
	h.buf_alloc = (sel & 16) ? fin_u32(f) : 256 * 1024;
	h.fwd_cnt = fin_u32(f);
	h.len = (sel & 32) ? fin_u32(f) : plen;
	if (h.op != VIRTIO_VSOCK_OP_RW && !(sel & 32))
		h.len = plen = 0;

	gpa = layout == 5 ? FE_GPA_BASE + FE_RAM_SIZE / 2 - 30 : FE_GPA_BASE + base;
	{
		uint8_t *p = ram(gpa - FE_GPA_BASE, HDR + plen);
		memcpy(p, &h, HDR);
		for (i = 0; i < plen; i++)
			p[HDR + i] = (uint8_t)(i * 7);
	}
	switch (layout) {
	case 0: /* header + payload */
	default:
		n = plen ? 2 : 1;
		for (i = 0; i < n; i++)
			ids[i] = alloc_desc(r);
		set_desc(r, ids[0], gpa, HDR, n > 1 ? VRING_DESC_F_NEXT : 0, ids[1 % n]);
		if (n > 1)
			set_desc(r, ids[1], gpa + HDR, plen, 0, 0);
		break;
	case 1: /* one descriptor (also the straddling case) */
	case 5:
		ids[0] = alloc_desc(r);
		set_desc(r, ids[0], gpa, HDR + plen, 0, 0);
		break;
	case 2: /* header split in two */
		for (i = 0; i < 3; i++)
			ids[i] = alloc_desc(r);
		set_desc(r, ids[0], gpa, 7, VRING_DESC_F_NEXT, ids[1]);
		set_desc(r, ids[1], gpa + 7, HDR - 7 + plen, 0, 0);
		break;
	case 3: { /* scattered payload */
		unsigned pieces = 1 + plen / 512;
		if (pieces > 32)
			pieces = 32;
		for (i = 0; i <= pieces; i++)
			ids[i] = alloc_desc(r);
		set_desc(r, ids[0], gpa, HDR, VRING_DESC_F_NEXT, ids[1]);
		for (i = 1; i <= pieces; i++) {
			uint32_t per = (plen + pieces - 1) / pieces, off = (i - 1) * per;
			uint32_t l = off >= plen ? 0 : (plen - off < per ? plen - off : per);
			set_desc(r, ids[i], gpa + HDR + off, l, i < pieces ? VRING_DESC_F_NEXT : 0,
				 i < pieces ? ids[i + 1] : 0);
		}
		break;
	}
	case 4: { /* indirect */
		uint64_t t = base + 0x4800;
		struct vring_desc *tab = ram(t, 3 * 16);
		tab[0] = (struct vring_desc){ gpa, 10, VRING_DESC_F_NEXT, 1 };
		tab[1] = (struct vring_desc){ gpa + 10, HDR - 10, plen ? VRING_DESC_F_NEXT : 0, 2 };
		tab[2] = (struct vring_desc){ gpa + HDR, plen, 0, 0 };
		ids[0] = alloc_desc(r);
		set_desc(r, ids[0], FE_GPA_BASE + t, (plen ? 3 : 2) * 16, VRING_DESC_F_INDIRECT, 0);
		break;
	}
	}
	publish(r, ids[0]);
	if (sel & 0x80)
		kick(1);
}

static void op_rxpost(struct fin *f)
{
	struct ring *r = &rings[0];
	uint8_t cnt = fin_u8(f) % 33, mode = fin_u8(f);
	uint16_t size = fin_u16(f) % RX_SLOT;

	while (cnt--) {
		uint16_t head = alloc_desc(r);
		uint64_t gpa = FE_GPA_BASE + RX_BASE + (uint64_t)(head % 32) * RX_SLOT;
		ram(gpa - FE_GPA_BASE, size);
		if ((mode & 3) == 1 && size > 20) { /* split inside the header */
			uint16_t second = alloc_desc(r);
			set_desc(r, head, gpa, 20, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, second);
			set_desc(r, second, gpa + 20, size - 20, VRING_DESC_F_WRITE, 0);
			if (second == head)
				r->tracking = false; /* ring of one: the chain loops */
		} else {
			set_desc(r, head, gpa, size, VRING_DESC_F_WRITE, 0);
		}
		/* only heads in the first 32 have their own slot */
		if (head < 32)
			r->posted_len[head] = size;
		else
			r->tracking = false;
		publish(r, head);
	}
	if (!(mode & 4))
		kick(0);
}

static void op_host(struct fin *f)
{
	uint8_t action = fin_u8(f), k = fin_u8(f);
	uint16_t arg = fin_u16(f);
	struct hc *h = &conns[k % MAX_CONNS];
	uint8_t buf[4096];

	if ((action & 7) == 4) { /* dial the guest */
		struct hc *s = hc_slot();
		if (s) {
			s->c = vsock_connect(fe.dev, 1000 + (arg & 3), &hc_ops, s);
			s->reader = arg & 4;
		}
	} else if (h->c) {
		switch (action & 7) {
		case 0:
			memset(buf, 'x', sizeof(buf));
			vsock_conn_write(h->c, buf, arg % sizeof(buf));
			break;
		case 1:
			vsock_conn_read(h->c, buf, arg % sizeof(buf));
			break;
		case 2:
			vsock_conn_shutdown(h->c, arg % 4);
			break;
		case 3:
			vsock_conn_close(h->c);
			h->c = NULL;
			break;
		case 5:
			h->reader = !h->reader;
			break;
		case 6: { /* splice from a pipe holding arg bytes */
			int p[2];
			if (pipe(p) == 0) {
				memset(buf, 'y', sizeof(buf));
				if (write(p[1], buf, arg % sizeof(buf)) < 0)
					abort();
				close(p[1]);
				vsock_conn_splice_from_fd(h->c, p[0]);
				close(p[0]);
			}
			break;
		}
		case 7: { /* splice into a socket */
			int sv[2];
			if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0) {
				vsock_conn_splice_to_fd(h->c, sv[0]);
				close(sv[0]);
				close(sv[1]);
			}
			break;
		}
		}
		if (h->c)
			(void)vsock_conn_readable(h->c);
	}
	fe_pump(&fe); /* notes and flushes deferred from API calls */
	check_used(0);
	check_used(1);
}

static void ring_addr_msg(unsigned i)
{
	struct vhost_user_vring_addr a = {
		.index = i,
		.desc_user_addr = (uintptr_t)rings[i].desc,
		.avail_user_addr = (uintptr_t)rings[i].avail,
		.used_user_addr = (uintptr_t)rings[i].used,
	};
	fe_msg(&fe, VHOST_USER_SET_VRING_ADDR, 0, &a, sizeof(a), NULL, 0);
}

/* A guest driver reset of one ring mid-traffic: stop, new base, restart. */
static void op_restart(struct fin *f)
{
	uint8_t i = fin_u8(f) & 1;
	uint16_t base = fin_u16(f);
	struct vhost_user_vring_state st = { i, 0 };
	uint64_t u = i;

	fe_msg(&fe, VHOST_USER_GET_VRING_BASE, 0, &st, sizeof(st), NULL, 0);
	st.num = base;
	fe_msg(&fe, VHOST_USER_SET_VRING_BASE, 0, &st, sizeof(st), NULL, 0);
	rings[i].avail_idx = base;
	__atomic_store_n(&rings[i].avail->idx, base, __ATOMIC_RELEASE);
	rings[i].last_used = rings[i].used->idx;
	ring_addr_msg(i);
	fe_msg(&fe, VHOST_USER_SET_VRING_KICK, 0, &u, 8, &fe.kick[i], 1);
	check_used(0);
	check_used(1);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static bool init;
	struct fin f = { data, size };
	uint8_t cfg;
	uint64_t feats = (1ull << VIRTIO_F_VERSION_1);
	uint64_t offs[2][3];
	unsigned i, ops = 0;
	int lowest;

	if (!init) {
		init = true;
		fe_global_init(&fe);
	}
	lowest = fe_lowest_free_fd();
	cfg = fin_u8(&f);
	if (cfg & 1)
		feats |= 1ull << VIRTIO_RING_F_EVENT_IDX;
	if (cfg & 2)
		feats |= 1ull << VIRTIO_RING_F_INDIRECT_DESC;
	if (!(cfg & 64))
		feats |= 1ull << VHOST_USER_F_PROTOCOL_FEATURES;
	memset(rings, 0, sizeof(rings));
	memset(conns, 0, sizeof(conns));
	tx_slot = 0;
	accepted = 0;
	used_scribbled = false;
	dirty_lo = 0;
	dirty_hi = 0x8000;
	memset(fe.ram, 0, 0x8000);
	for (i = 0; i < 2; i++) {
		struct ring *r = &rings[i];
		r->num = 1u << (((cfg >> 2) & 15) % 9);
		offs[i][0] = i * RING_AREA;
		offs[i][1] = i * RING_AREA + 0x1000;
		offs[i][2] = i * RING_AREA + 0x2000;
		r->desc = (struct vring_desc *)(fe.ram + offs[i][0]);
		r->avail = (struct vring_avail *)(fe.ram + offs[i][1]);
		r->used = (struct vring_used *)(fe.ram + offs[i][2]);
		r->tracking = true;
	}
	fe_start(&fe, on_accept, NULL);
	fe_setup(&fe, feats, rings[0].num, (const uint64_t(*)[3])offs);

	while (fin_left(&f) && fe.sock >= 0 && ops++ < 512) {
		uint8_t op = fin_u8(&f);
		struct ring *r = &rings[(op >> 7) & 1];

		switch ((op & 0x7f) % 10) {
		case 0: { /* write one descriptor */
			uint16_t idx = fin_u16(&f);
			uint32_t a = fin_u32(&f), len = fin_u32(&f);
			uint16_t flags = fin_u16(&f), next = fin_u16(&f);
			uint64_t g = gpa_of(a);
			set_desc(r, idx, g, len, flags, next);
			if (r == &rings[0])
				r->tracking = false;
			/* a buffer over its own rings: the device may rightly write
			 * packet bytes into the used ring, so its ids are the guest's
			 * garbage, not the device's */
			if (g >= FE_GPA_BASE ? g - FE_GPA_BASE < 0x8000 : FE_GPA_BASE - g < len)
				used_scribbled = true;
			break;
		}
		case 1: /* make a head available */
			publish(r, fin_u16(&f));
			if (r == &rings[0])
				r->tracking = false;
			break;
		case 2: /* overwrite avail->idx */
			r->avail_idx = fin_u16(&f);
			__atomic_store_n(&r->avail->idx, r->avail_idx, __ATOMIC_RELEASE);
			if (r == &rings[0])
				r->tracking = false;
			break;
		case 3:
			kick((op >> 7) & 1);
			break;
		case 4:
			op_pkt(&f);
			break;
		case 5:
			op_rxpost(&f);
			break;
		case 6:
			op_host(&f);
			break;
		case 7: { /* raw bytes anywhere in the first region */
			uint32_t off = fin_u32(&f) % (FE_RAM_SIZE - 256);
			const uint8_t *p;
			size_t n = fin_take(&f, &p, fin_u8(&f));
			memcpy(ram(off, n), p, n);
			if (off < 0x8000 || (off + n > RX_BASE && off < RX_BASE + 32 * RX_SLOT))
				rings[0].tracking = false;
			if (off < 0x8000 && n)
				used_scribbled = true;
			break;
		}
		case 8:
			op_restart(&f);
			break;
		case 9: /* avail flags and used_event */
			r->avail->flags = fin_u16(&f);
			r->avail->ring[r->num] = fin_u16(&f);
			break;
		}
		check_reserve();
	}

	if (getenv("FUZZ_VERBOSE"))
		fprintf(stderr, "fuzz: rx used %u, tx used %u, accepted %u, frontend %s\n",
			rings[0].last_used, rings[1].last_used, accepted,
			fe.sock >= 0 ? "connected" : "dropped");
	/* the host lets go of everything, then QEMU goes away */
	for (i = 0; i < MAX_CONNS; i++)
		if (conns[i].c) {
			vsock_conn_close(conns[i].c);
			conns[i].c = NULL;
		}
	fe_pump(&fe);
	fe_stop(&fe);
	memset(fe.ram + dirty_lo, 0, dirty_hi - dirty_lo);

	fe_check_fds(lowest);
	return 0;
}
