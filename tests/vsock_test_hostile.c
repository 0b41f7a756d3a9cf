/* Hostile guests (issue "Hardening", item 3).  Each scenario runs two VMs in
 * this process: VM A (HA/VA) misbehaves, VM B (HB/VB) is a bystander.  Every
 * scenario asserts that
 *   - an existing well-behaved connection of A keeps moving data both ways,
 *   - VM B's existing connection and a fresh one keep working,
 *   - the hostile guest loses at most its own connections,
 *   - the process's RssAnon grows by less than RSS_BOUND_KIB while the guest
 *     pushes about 64 MiB of hostile attempts (documented bound: 8 MiB; the
 *     device's own buffers are bounded by the window it gave each connection
 *     from the guest, VSOCK_TXBUF per connection to it and VSOCK_CTRLQ
 *     connection-less replies), or, for a guest that fills every window, by
 *     VSOCK_RX_BUDGET + VSOCK_BUF_MIN per connection more than that.
 * The test reads a few device internals (nconns, stats) through vsock_int.h
 * to assert that no connection was created and packets were dropped. */
#include "config.h"

#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "log.h"
#include "util.h"
#include "vsock/vsock_int.h"
#include "vsock_testlib.h"

#define RSS_BOUND_KIB (8 * 1024)
#define HPORT 1500u

static struct host HA, HB;
static struct vd VA, VB;
static struct gstream gA, gB; /* the bystander connections of A and B */

/* Anonymous resident memory (RssAnon): the device's heap.  VmRSS would also
 * count the test guest's RAM (a shared memfd mapped twice in this process),
 * which grows as the driver touches its tx slots; both are printed. */
static long status_kib(const char *key)
{
	FILE *f = fopen("/proc/self/status", "r");
	char line[256];
	long kib = -1;
	size_t kl = strlen(key);

	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f))
		if (!strncmp(line, key, kl) && line[kl] == ':' &&
		    sscanf(line + kl + 1, " %ld", &kib) == 1)
			break;
	fclose(f);
	return kib;
}

static long rss_kib(void)
{
	return status_kib("RssAnon");
}

static struct hconn *find_hc(struct host *h, uint32_t gport)
{
	for (unsigned i = h->naccepted; i-- > 0;)
		if (h->accepted[i]->guest_port == gport)
			return h->accepted[i];
	return NULL;
}

/* An existing connection moves n bytes each way, verified. */
static bool works(struct host *h, struct vd *v, struct gstream *g, uint32_t seed)
{
	const uint64_t n = 100000;
	struct hconn *hc = find_hc(h, g->gport);

	if (!hc || hc->closed || g->rst)
		return false;
	big_lock();
	hc->rx_bytes = 0;
	hc->rx_seed = seed;
	hc->rx_bad = false;
	big_unlock();
	if (gs_send_data(v, g, seed, n, true) != 0)
		return false;
	if (!WAIT_FOR(v, hc->rx_bytes == n, 3000) || hc->rx_bad)
		return false;
	g->rx_seed = seed + 1;
	g->rx_bytes = 0;
	big_lock();
	hc->tx_seed = seed + 1;
	hc->tx_done = 0;
	hc->tx_total = n;
	hconn_pump_tx(hc);
	big_unlock();
	for (int i = 0; i < 300 && g->rx_bytes < n; i++)
		gs_pump(v, &g, 1, 10, NULL);
	if (g->rx_bytes != n || g->rx_bad)
		fprintf(stderr, "  works(%u): guest got %llu bad=%d\n", g->gport,
			(unsigned long long)g->rx_bytes, g->rx_bad);
	return g->rx_bytes == n && !g->rx_bad;
}

/* A fresh connection is accepted and works. */
static bool fresh_works(struct host *h, struct vd *v, uint32_t gport)
{
	static struct gstream pool[64];
	static unsigned npool;
	struct gstream *g = &pool[npool++ % ARRAY_SIZE(pool)];
	unsigned before = h->naccepted;

	gs_init(g, gport, HPORT, 65536);
	if (gs_connect(v, g) != 0) {
		fprintf(stderr, "  fresh connect from %u failed\n", gport);
		return false;
	}
	if (!WAIT_FOR(v, h->naccepted == before + 1, 1000))
		return false;
	return works(h, v, g, gport);
}

static int setup(const struct vd_opts *oa, unsigned max_conns_a)
{
	static const struct vd_opts ob = { .event_idx = true, .indirect = true };
	int r;

	if ((r = fixture_open(&HA, &VA, max_conns_a, oa)) < 0 ||
	    (r = fixture_open(&HB, &VB, 0, &ob)) < 0)
		return r;
	HA.accept_auto_read = HB.accept_auto_read = true;
	gs_init(&gA, 30000, HPORT, 65536);
	gs_init(&gB, 31000, HPORT, 65536);
	if (gs_connect(&VA, &gA) != 0 || gs_connect(&VB, &gB) != 0)
		return -ECONNREFUSED;
	if (!WAIT_FOR(&VA, HA.naccepted == 1 && HB.naccepted == 1, 1000))
		return -ETIMEDOUT;
	/* warm up both directions (allocator arenas) before RSS is sampled */
	if (!works(&HA, &VA, &gA, 1) || !works(&HB, &VB, &gB, 2))
		return -EIO;
	return 0;
}

static void teardown(void)
{
	fixture_close(&HA, &VA);
	fixture_close(&HB, &VB);
}

/* The bystanders: A's existing connection, B's existing and a new one. */
static bool bystanders_ok(uint32_t seed)
{
	bool a = works(&HA, &VA, &gA, seed), b = works(&HB, &VB, &gB, seed + 10),
	     c = fresh_works(&HB, &VB, 31100 + seed);

	if (!a || !b || !c)
		fprintf(stderr, "  bystanders: A-existing %d B-existing %d B-fresh %d\n", a, b, c);
	return a && b && c;
}

static unsigned a_nconns(void)
{
	unsigned n;
	big_lock();
	n = HA.dev->nconns;
	big_unlock();
	return n;
}

/* Count the packets v receives within ms (nothing is routed). */
static unsigned drain(struct vd *v, int ms, unsigned *nrst, unsigned *nresp)
{
	struct vd_pkt p;
	unsigned n = 0;

	while (vd_recv(v, &p, ms) == 0) {
		n++;
		ms = MIN(ms, 10);
		if (nrst && p.hdr.op == VIRTIO_VSOCK_OP_RST)
			(*nrst)++;
		if (nresp && p.hdr.op == VIRTIO_VSOCK_OP_RESPONSE)
			(*nresp)++;
		free(p.data);
	}
	return n;
}

#define CHECK_RSS(before)                                                                  \
	do {                                                                               \
		long _after = rss_kib();                                                   \
		fprintf(stderr, "  %s: RssAnon %ld -> %ld KiB (+%ld), VmRSS now %ld KiB\n", \
			t_current, (before), _after, _after - (before), status_kib("VmRSS")); \
		CHECK(_after - (before) < RSS_BOUND_KIB);                                 \
	} while (0)

/* ------------------------------------------------------------------ 1 */

static void set(struct vring_desc *d, uint64_t a, uint32_t l, uint16_t f, uint16_t n)
{
	d->addr = a;
	d->len = l;
	d->flags = f;
	d->next = n;
}

/* Malformed chains not covered by vsock_test_ring: a loop through every
 * descriptor of the ring (a chain longer than the ring), repeated 4096
 * times, and malformed *rx* buffers (the device writes into them): outside
 * RAM, address wrap, 4 GiB length, self loop, device-readable only. */
static void t_bad_chains(void)
{
	struct vd_opts o = { .event_idx = true, .qsize = 64 };
	static uint8_t junk[65536];
	uint16_t ids[64];
	long rss;

	CHECK(setup(&o, 0) == 0);
	rss = rss_kib();
	/* tx: 64-descriptor loop over the whole ring, also with 64 KiB
	 * descriptors so every pass "pushes" 4 MiB: 4096 x 16 KiB-ish */
	for (unsigned k = 0; k < 1024; k++) {
		CHECK(vd_raw_alloc(&VA, 64, ids) == 0);
		for (unsigned i = 0; i < 64; i++)
			set(&VA.tx.desc[ids[i]], VA.scratch_gpa, i ? 1024 : 44, VRING_DESC_F_NEXT,
			    ids[(i + 1) % 64]);
		memcpy(vd_gpa(&VA, VA.scratch_gpa, sizeof(junk) / 64), junk, sizeof(junk) / 64);
		vd_raw_post(&VA, ids[0]);
	}
	CHECK(WAIT_FOR(&VA, vd_tx_inflight(&VA) == 0, 2000));
	CHECK_EQ(HA.naccepted, 1);
	CHECK_EQ(a_nconns(), 1);

	/* rx: poison the next posted rx buffers while the device is idle */
	drain(&VA, 50, NULL, NULL);
	{
		struct vd_ring *r = &VA.rx;
		uint64_t wrapaddr = UINT64_MAX - 10;
		unsigned k = 0;
		for (unsigned round = 0; round < 2; round++) {
			for (unsigned i = 0; i < 5; i++, k++) {
				uint16_t head = r->avail->ring[(uint16_t)(r->last_used + k) % r->num];
				struct vring_desc *d = &r->desc[head];
				switch (i) {
				case 0: set(d, 0x1000, 4096, VRING_DESC_F_WRITE, 0); break;
				case 1: set(d, wrapaddr, 4096, VRING_DESC_F_WRITE, 0); break;
				case 2: set(d, VA.scratch_gpa, 0xffffffffu, VRING_DESC_F_WRITE, 0); break;
				case 3: set(d, VA.scratch_gpa, 4096,
					    VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, head);
					break;
				case 4: set(d, VA.scratch_gpa, 4096, 0, 0); break; /* readable */
				}
			}
		}
	}
	/* host -> guest traffic must skip the poisoned buffers and arrive */
	CHECK(works(&HA, &VA, &gA, 3));
	CHECK(bystanders_ok(4));
	CHECK(fresh_works(&HA, &VA, 30100));
	CHECK_RSS(rss);
	teardown();
}

/* ------------------------------------------------------------------ 2 */

/* Packets with a source CID that is not the guest's own (the host, VM B,
 * A's cid with high bits set) or to a destination other than the host are
 * dropped: no connection, no RST to anyone, existing pairs untouched. */
static void t_wrong_cid(void)
{
	struct vd_opts o = { .event_idx = true };
	struct virtio_vsock_hdr h;
	struct hconn *hcA;
	uint64_t dropped0, dropped1;
	unsigned sent = 0;
	long rss;

	CHECK(setup(&o, 0) == 0);
	hcA = find_hc(&HA, gA.gport);
	const uint64_t bad_src[] = { VSOCK_HOST_CID, HB.cid, HA.cid | (1ull << 32), 0,
				     UINT64_MAX };
	const uint16_t ops[] = { VIRTIO_VSOCK_OP_REQUEST, VIRTIO_VSOCK_OP_RW,
				 VIRTIO_VSOCK_OP_SHUTDOWN, VIRTIO_VSOCK_OP_CREDIT_REQUEST,
				 VIRTIO_VSOCK_OP_CREDIT_UPDATE, VIRTIO_VSOCK_OP_RESPONSE,
				 VIRTIO_VSOCK_OP_RST };
	big_lock();
	dropped0 = HA.dev->stats.dropped;
	big_unlock();
	rss = rss_kib();
	for (unsigned rep = 0; rep < 16; rep++) {
		for (unsigned s = 0; s < ARRAY_SIZE(bad_src); s++) {
			for (unsigned k = 0; k < ARRAY_SIZE(ops); k++) {
				/* on A's existing pair, on B's pair, on a new pair */
				const uint32_t gports[] = { gA.gport, gB.gport, 32000 + k };
				for (unsigned j = 0; j < 3; j++) {
					uint32_t len = ops[k] == VIRTIO_VSOCK_OP_RW ? 4 : 0;
					vd_hdr(&VA, &h, gports[j], HPORT, ops[k], len, 65536, 0);
					h.src_cid = bad_src[s];
					if (ops[k] == VIRTIO_VSOCK_OP_SHUTDOWN)
						h.flags = VSOCK_SHUTDOWN_BOTH;
					CHECK_EQ(vd_send(&VA, &h, "evil", len, VD_ONE), 0);
					sent++;
				}
			}
		}
		/* right source, but to VM B / to itself instead of the host */
		const uint64_t bad_dst[] = { HB.cid, HA.cid, 0, 1 };
		for (unsigned s = 0; s < ARRAY_SIZE(bad_dst); s++) {
			vd_hdr(&VA, &h, 32100 + s, HPORT, VIRTIO_VSOCK_OP_REQUEST, 0, 65536, 0);
			h.dst_cid = bad_dst[s];
			CHECK_EQ(vd_send(&VA, &h, NULL, 0, VD_ONE), 0);
			vd_hdr(&VA, &h, gB.gport, HPORT, VIRTIO_VSOCK_OP_RST, 0, 65536, 0);
			h.dst_cid = bad_dst[s];
			CHECK_EQ(vd_send(&VA, &h, NULL, 0, VD_ONE), 0);
			sent += 2;
		}
	}
	CHECK(WAIT_FOR(&VA, vd_tx_inflight(&VA) == 0, 1000));
	/* silence on both guests: no RST to the impersonated peer or anyone */
	CHECK_EQ(drain(&VA, 100, NULL, NULL), 0);
	CHECK_EQ(drain(&VB, 100, NULL, NULL), 0);
	big_lock();
	dropped1 = HA.dev->stats.dropped;
	big_unlock();
	CHECK_EQ(dropped1 - dropped0, sent);
	CHECK_EQ(HA.naccepted, 1);
	CHECK_EQ(a_nconns(), 1);
	CHECK(!hcA->closed);
	CHECK_EQ(hcA->rx_bytes, 100000); /* the spoofed RW data was not delivered */
	CHECK(!gA.rst && !gB.rst);
	CHECK(bystanders_ok(5));
	CHECK_RSS(rss);
	teardown();
}

/* ------------------------------------------------------------------ 3 */

/* 10000 REQUESTs with distinct ports against a limit of 64. */
static void t_request_flood(void)
{
	struct vd_opts o = { .event_idx = true, .qsize = 256 };
	enum { LIMIT = 64, FLOOD = 10000 };
	struct virtio_vsock_hdr h;
	unsigned rst = 0, resp = 0;
	uint64_t ctrl_dropped;
	struct vsock_conn *c;
	long rss;

	CHECK(setup(&o, LIMIT) == 0);
	rss = rss_kib();
	for (unsigned i = 0; i < FLOOD; i++) {
		vd_hdr(&VA, &h, 40000 + i, HPORT, VIRTIO_VSOCK_OP_REQUEST, 0, 65536, 0);
		CHECK_EQ(vd_send(&VA, &h, NULL, 0, VD_ONE), 0);
		if (i % 64 == 63)
			drain(&VA, 0, &rst, &resp);
	}
	drain(&VA, 200, &rst, &resp);
	big_lock();
	ctrl_dropped = HA.dev->stats.ctrl_dropped;
	big_unlock();
	fprintf(stderr, "  flood: %u RESPONSE, %u RST, %llu RST dropped (ctrlq full)\n", resp,
		rst, (unsigned long long)ctrl_dropped);
	CHECK_EQ(resp, LIMIT - 1);
	CHECK(rst <= FLOOD - (LIMIT - 1));
	CHECK_EQ(rst + ctrl_dropped, FLOOD - (LIMIT - 1));
	CHECK_EQ(a_nconns(), LIMIT);
	CHECK_EQ(HA.naccepted, LIMIT);
	big_lock();
	errno = 0;
	c = vsock_connect(HA.dev, 3000, &hconn_ops, NULL);
	big_unlock();
	CHECK(c == NULL && errno == EMFILE);
	CHECK_RSS(rss);
	CHECK(bystanders_ok(6));
	/* the flooder lets 8 go: slots free up, a new connection succeeds */
	for (unsigned i = 1; i <= 8; i++) {
		uint32_t gp = HA.accepted[i]->guest_port;
		vd_hdr(&VA, &h, gp, HPORT, VIRTIO_VSOCK_OP_RST, 0, 65536, 0);
		CHECK_EQ(vd_send(&VA, &h, NULL, 0, VD_ONE), 0);
	}
	CHECK(WAIT_FOR(&VA, HA.accepted[8]->closed, 1000));
	CHECK_EQ(a_nconns(), LIMIT - 8);
	CHECK(fresh_works(&HA, &VA, 30200));
	teardown();
}

/* ------------------------------------------------------------------ 4 */

/* Receive on the liar's pair: content checked against seed 77 at *rx;
 * returns the RW bytes received within ms; other packets are routed. */
static uint32_t liar_recv(struct gstream *g, uint64_t *rx, int ms, bool *rst, bool *bad)
{
	struct vd_pkt p;
	uint32_t got = 0;

	while (vd_recv(&VA, &p, ms) == 0) {
		if (p.hdr.src_port == g->hport && p.hdr.dst_port == g->gport) {
			if (p.hdr.op == VIRTIO_VSOCK_OP_RST)
				*rst = true;
			if (p.hdr.op == VIRTIO_VSOCK_OP_RW) {
				if (!gen_check(77, *rx, p.data, p.len))
					*bad = true;
				*rx += p.len;
				got += p.len;
			}
		} else {
			gs_handle(&VA, &gA, &p);
		}
		free(p.data);
		ms = MIN(ms, 20);
	}
	return got;
}

/* Host writes (seed 77) until -EAGAIN or max attempts; returns accepted. */
static uint64_t host_fill(struct vsock_conn *c, uint64_t *wrote, unsigned attempts,
			  ssize_t *last)
{
	static uint8_t buf[65536];
	uint64_t acc = 0;

	big_lock();
	for (unsigned i = 0; i < attempts; i++) {
		gen_fill(77, *wrote, buf, sizeof(buf));
		*last = vsock_conn_write(c, buf, sizeof(buf));
		if (*last > 0) {
			*wrote += (uint64_t)*last;
			acc += (uint64_t)*last;
		}
	}
	big_unlock();
	return acc;
}

static int credit_update(struct gstream *g, uint32_t buf_alloc, uint32_t fwd_cnt)
{
	struct virtio_vsock_hdr h;

	vd_hdr(&VA, &h, g->gport, g->hport, VIRTIO_VSOCK_OP_CREDIT_UPDATE, 0, buf_alloc, fwd_cnt);
	if (vd_send(&VA, &h, NULL, 0, VD_ONE) < 0)
		return -1;
	return WAIT_FOR(&VA, vd_tx_inflight(&VA) == 0, 1000) ? 0 : -1;
}

static void t_credit_lies(void)
{
	struct vd_opts o = { .event_idx = true, .qsize = 256 };
	static struct gstream gl;
	struct hconn *hc;
	uint64_t wrote = 0, rx = 0;
	bool rst = false, bad = false;
	ssize_t last = 0;
	long rss;

	CHECK(setup(&o, 0) == 0);
	rss = rss_kib();
	/* (a) buf_alloc 0: the host writer gets at most its txbuf in, then
	 * -EAGAIN, over 64 MiB of attempts; nothing reaches the guest */
	gs_init(&gl, 30300, HPORT, 0);
	gl.credit_updates = false;
	CHECK_EQ(gs_connect(&VA, &gl), 0);
	CHECK(WAIT_FOR(&VA, (hc = find_hc(&HA, gl.gport)) != NULL, 1000));
	uint64_t acc = host_fill(hc->c, &wrote, 1024, &last);
	fprintf(stderr, "  buf_alloc 0: host accepted %llu of 64 MiB, last %zd\n",
		(unsigned long long)acc, last);
	CHECK(acc <= VSOCK_TXBUF);
	CHECK_EQ(last, -EAGAIN);
	big_lock();
	size_t wr = vsock_conn_writable(hc->c);
	big_unlock();
	CHECK_EQ(wr, 0);
	CHECK_EQ(liar_recv(&gl, &rx, 100, &rst, &bad), 0);
	CHECK_RSS(rss);

	/* (b) fwd_cnt ahead of what was sent (or far behind): never more than
	 * buf_alloc - (tx_cnt - fwd_cnt) in flight, and no huge window */
	const uint32_t lies[] = { 1, 4096, 65536, 0x80000000u, 0xfffff000u, 0xffffff00u, 7 };
	for (unsigned i = 0; i < ARRAY_SIZE(lies); i++) {
		uint32_t tx = (uint32_t)rx, fwd = tx + lies[i], inflight = tx - fwd;
		uint32_t allowed = inflight >= 4096 ? 0 : 4096 - inflight;
		CHECK_EQ(credit_update(&gl, 4096, fwd), 0);
		uint32_t got = liar_recv(&gl, &rx, 60, &rst, &bad);
		if (got > allowed)
			fprintf(stderr, "  fwd_cnt lie +%#x: got %u, allowed %u\n", lies[i], got,
				allowed);
		CHECK(got <= allowed);
		CHECK(!rst && !bad);
	}
	/* (c) buf_alloc changing between packets (fwd_cnt honest): after an
	 * update (B, fwd_cnt = rx) the host may have sent rx + B bytes in all */
	const uint32_t sizes[] = { 1000, 50000, 1, 0, 300000, 17, 65536 };
	for (unsigned i = 0; i < ARRAY_SIZE(sizes); i++) {
		uint64_t base = rx;
		CHECK_EQ(credit_update(&gl, sizes[i], (uint32_t)rx), 0);
		liar_recv(&gl, &rx, 40, &rst, &bad);
		CHECK(rx - base <= sizes[i]);
		host_fill(hc->c, &wrote, 4, &last); /* more queued meanwhile */
		CHECK(wrote - rx <= VSOCK_TXBUF + sizes[i]);
		liar_recv(&gl, &rx, 40, &rst, &bad);
		if (rx - base > sizes[i])
			fprintf(stderr, "  buf_alloc %u: got %llu\n", sizes[i],
				(unsigned long long)(rx - base));
		CHECK(rx - base <= sizes[i]);
		CHECK(!rst && !bad);
	}
	/* shrink below what is in flight: nothing more */
	CHECK_EQ(credit_update(&gl, 100, (uint32_t)rx - 20000), 0);
	CHECK_EQ(liar_recv(&gl, &rx, 60, &rst, &bad), 0);
	/* honest from now on: everything accepted arrives intact */
	for (int i = 0; i < 100 && rx < wrote; i++) {
		CHECK_EQ(credit_update(&gl, 65536, (uint32_t)rx), 0);
		liar_recv(&gl, &rx, 20, &rst, &bad);
	}
	CHECK_EQ(rx, wrote);
	CHECK(!rst && !bad && !hc->closed);
	CHECK(bystanders_ok(7));
	CHECK_RSS(rss);
	teardown();
}

/* ------------------------------------------------------------------ 5 */

/* The guest posts no more rx buffers (it never reads): host writers get
 * -EAGAIN after a bounded amount, and the guest's tx keeps draining. */
static void t_rx_never_read(void)
{
	struct vd_opts o = { .event_idx = true, .qsize = 64 };
	enum { N = 16 };
	static struct gstream g[N];
	struct hconn *hc[N];
	uint64_t acc[N], wrote[N], total = 0;
	struct vring_used *real, *fake;
	struct virtio_vsock_hdr h;
	long rss;

	CHECK(setup(&o, 0) == 0);
	for (int i = 0; i < N; i++) {
		gs_init(&g[i], 33000 + i, HPORT, 65536);
		g[i].rx_seed = 77;
		CHECK_EQ(gs_connect(&VA, &g[i]), 0);
	}
	CHECK(WAIT_FOR(&VA, HA.naccepted == N + 1, 1000));
	for (int i = 0; i < N; i++)
		CHECK((hc[i] = find_hc(&HA, g[i].gport)) != NULL);
	drain(&VA, 20, NULL, NULL);
	rss = rss_kib();
	/* hide the rx used ring from the driver: it never reaps nor reposts */
	real = VA.rx.used;
	fake = calloc(1, sizeof(*fake) + 8 * VA.rx.num + 8);
	fake->idx = VA.rx.last_used;
	VA.rx.used = fake;
	uint64_t rx_count0 = VA.rx_count;
	/* 16 writers x 4 MiB of attempts */
	for (int i = 0; i < N; i++) {
		ssize_t last = 0;
		wrote[i] = 0;
		acc[i] = host_fill(hc[i]->c, &wrote[i], 64, &last);
		CHECK_EQ(last, -EAGAIN);
		CHECK(acc[i] <= 65536 + VSOCK_TXBUF); /* guest credit + txbuf */
		total += acc[i];
	}
	fprintf(stderr, "  rx never read: host accepted %llu of 64 MiB\n",
		(unsigned long long)total);
	/* the guest keeps sending: data, CREDIT_REQUESTs, RW to unknown ports
	 * (RST owed), REQUESTs (RESPONSE owed): tx must keep draining */
	for (int i = 0; i < N; i++) {
		big_lock();
		hc[i]->rx_bytes = 0;
		hc[i]->rx_seed = 5;
		big_unlock();
		CHECK_EQ(gs_send_data(&VA, &g[i], 5, 60000, true), 0);
	}
	for (unsigned i = 0; i < 3000; i++) {
		if (i % 3 == 0)
			vd_hdr(&VA, &h, g[i % N].gport, HPORT, VIRTIO_VSOCK_OP_CREDIT_REQUEST, 0,
			       65536, 0);
		else if (i % 3 == 1)
			vd_hdr(&VA, &h, 34000 + i, 7000, VIRTIO_VSOCK_OP_RW, 0, 65536, 0);
		else
			vd_hdr(&VA, &h, 35000 + i, HPORT, VIRTIO_VSOCK_OP_REQUEST, 0, 65536, 0);
		CHECK_EQ(vd_send(&VA, &h, NULL, 0, VD_ONE), 0);
	}
	CHECK(WAIT_FOR(&VA, vd_tx_inflight(&VA) == 0, 2000));
	CHECK_EQ(VA.rx_count, rx_count0); /* the guest really read nothing */
	for (int i = 0; i < N; i++)
		CHECK(WAIT_FOR(&VA, hc[i]->rx_bytes == 60000 && !hc[i]->rx_bad, 2000));
	/* every REQUEST got an answer: accepted, or refused at the fixture's cap */
	CHECK(WAIT_FOR(&VA, HA.naccepted == MIN(HOST_MAX_ACCEPT, N + 1 + 1000), 2000));
	CHECK_RSS(rss);
	CHECK(works(&HB, &VB, &gB, 8));
	CHECK(fresh_works(&HB, &VB, 31200));
	/* the guest reads again: everything accepted arrives intact */
	VA.rx.used = real;
	free(fake);
	vd_post_rx(&VA);
	bool done = false;
	for (int k = 0; k < 300 && !done; k++) {
		gs_pump(&VA, NULL, 0, 10, NULL);
		done = true;
		for (int i = 0; i < N; i++)
			done &= g[i].rx_bytes == acc[i];
	}
	for (int i = 0; i < N; i++) {
		CHECK_EQ(g[i].rx_bytes, acc[i]);
		CHECK(!g[i].rx_bad && !g[i].rst);
	}
	CHECK(works(&HA, &VA, &gA, 9));
	teardown();
}

/* ------------------------------------------------------------------ 6 */

/* After a RST (guest's or device's) the pair is unknown: RW, SHUTDOWN,
 * CREDIT_*, RESPONSE get one RST each, RST gets none, nothing revives. */
static void t_after_rst(void)
{
	struct vd_opts o = { .event_idx = true };
	static struct gstream g1, g2;
	static uint8_t buf[65536];
	const uint16_t ops[] = { VIRTIO_VSOCK_OP_RW, VIRTIO_VSOCK_OP_SHUTDOWN,
				 VIRTIO_VSOCK_OP_CREDIT_UPDATE, VIRTIO_VSOCK_OP_CREDIT_REQUEST,
				 VIRTIO_VSOCK_OP_RESPONSE, VIRTIO_VSOCK_OP_RST };
	struct virtio_vsock_hdr h;
	struct hconn *h1, *h2;
	unsigned rst = 0, n;
	long rss;

	CHECK(setup(&o, 0) == 0);
	/* g1: the guest resets it; g2: the device resets it (overrun) */
	gs_init(&g1, 30400, HPORT, 65536);
	gs_init(&g2, 30401, HPORT, 65536);
	CHECK_EQ(gs_connect(&VA, &g1), 0);
	CHECK_EQ(gs_connect(&VA, &g2), 0);
	CHECK(WAIT_FOR(&VA, HA.naccepted == 3, 1000));
	h1 = find_hc(&HA, g1.gport);
	h2 = find_hc(&HA, g2.gport);
	big_lock();
	h2->auto_read = false;
	big_unlock();
	CHECK_EQ(gs_send_ctrl(&VA, &g1, VIRTIO_VSOCK_OP_RST, 0), 0);
	CHECK(WAIT_FOR(&VA, h1->closed, 1000));
	CHECK_EQ(h1->err, ECONNRESET);
	for (int i = 0; i < 5; i++) {
		vd_hdr(&VA, &h, g2.gport, HPORT, VIRTIO_VSOCK_OP_RW, 65536, 65536, 0);
		CHECK_EQ(vd_send(&VA, &h, buf, 65536, VD_HDR_PAYLOAD), 0);
	}
	CHECK(WAIT_FOR(&VA, h2->closed, 1000));
	CHECK_EQ(drain(&VA, 100, &rst, NULL), 1); /* the overrun's RST */
	CHECK_EQ(rst, 1);
	CHECK_EQ(a_nconns(), 1);
	uint64_t r1 = h1->rx_bytes, r2 = h2->rx_bytes;
	int c1 = h1->readable_calls, c2 = h2->readable_calls;
	rss = rss_kib();
	for (unsigned rep = 0; rep < 100; rep++) {
		for (unsigned k = 0; k < ARRAY_SIZE(ops); k++) {
			const struct gstream *gs[2] = { &g1, &g2 };
			for (int j = 0; j < 2; j++) {
				uint32_t len = ops[k] == VIRTIO_VSOCK_OP_RW ? 65536 : 0;
				vd_hdr(&VA, &h, gs[j]->gport, HPORT, ops[k], len, 65536, 0);
				if (ops[k] == VIRTIO_VSOCK_OP_SHUTDOWN)
					h.flags = VIRTIO_VSOCK_SHUTDOWN_SEND;
				CHECK_EQ(vd_send(&VA, &h, buf, len, VD_HDR_PAYLOAD), 0);
			}
		}
		rst = 0;
		CHECK(WAIT_FOR(&VA, vd_tx_inflight(&VA) == 0, 1000));
		n = drain(&VA, 50, &rst, NULL);
		/* one RST per non-RST packet, none for the RSTs */
		CHECK_EQ(n, 2 * (ARRAY_SIZE(ops) - 1));
		CHECK_EQ(rst, n);
	}
	CHECK_EQ(a_nconns(), 1);
	CHECK_EQ(HA.naccepted, 3);
	CHECK(h1->rx_bytes == r1 && h2->rx_bytes == r2);
	CHECK(h1->readable_calls == c1 && h2->readable_calls == c2);
	CHECK_RSS(rss);
	CHECK(bystanders_ok(11));
	/* a REQUEST on the old pair is a new connection (legit), and works */
	uint32_t p1 = g1.gport;
	g1.gport = 0; /* its registry entry must not swallow the new stream's packets */
	CHECK(fresh_works(&HA, &VA, p1));
	teardown();
}

/* ------------------------------------------------------------------ 7 */

/* Sending beyond the credit given resets that connection only; 8 guests'
 * connections x 128 packets of 64 KiB (64 MiB) of overrun attempts. */
static void t_overrun(void)
{
	struct vd_opts o = { .event_idx = true, .qsize = 256 };
	enum { N = 8 };
	static struct gstream g[N];
	static uint8_t buf[65536];
	struct virtio_vsock_hdr h;
	struct hconn *hc[N];
	unsigned rst = 0;
	long rss;

	CHECK(setup(&o, 0) == 0);
	for (int i = 0; i < N; i++) {
		gs_init(&g[i], 30500 + i, HPORT, 65536);
		CHECK_EQ(gs_connect(&VA, &g[i]), 0);
		CHECK(WAIT_FOR(&VA, (hc[i] = find_hc(&HA, g[i].gport)) != NULL, 1000));
		big_lock();
		hc[i]->auto_read = false; /* the host reads nothing */
		big_unlock();
	}
	rss = rss_kib();
	for (unsigned k = 0; k < 128; k++) {
		for (int i = 0; i < N; i++) {
			vd_hdr(&VA, &h, g[i].gport, HPORT, VIRTIO_VSOCK_OP_RW, 65536, 65536, 0);
			CHECK_EQ(vd_send(&VA, &h, buf, 65536, VD_HDR_PAYLOAD), 0);
		}
		drain(&VA, 0, &rst, NULL);
	}
	CHECK(WAIT_FOR(&VA, vd_tx_inflight(&VA) == 0, 2000));
	drain(&VA, 100, &rst, NULL);
	for (int i = 0; i < N; i++) {
		CHECK(hc[i]->closed);
		CHECK_EQ(hc[i]->err, ECONNRESET);
	}
	/* 8 overrun RSTs, then one per packet on the dead pairs (some may be
	 * dropped when the bounded ctrl queue fills) */
	CHECK(rst >= N);
	CHECK(rst <= 128 * N);
	CHECK_EQ(a_nconns(), 1);
	CHECK_RSS(rss);
	CHECK(bystanders_ok(12));
	CHECK(fresh_works(&HA, &VA, 30600));
	teardown();
}

/* ------------------------------------------------------------------ 8 */

/* A guest that fills every connection's buffer while the host reads none
 * of them: what the VM makes the daemon hold is bounded by the device's
 * budget (VSOCK_RX_BUDGET + VSOCK_BUF_MIN per connection), not by
 * connections x VSOCK_BUF_ALLOC (1 GiB at 4096).  Later connections get
 * smaller windows; every byte accepted stays readable, also after the guest
 * closed; reading it gives the budget back. */
static void t_hoard(void)
{
	struct vd_opts o = { .event_idx = true, .qsize = 256 };
	enum { N = 1024 };
	static struct gstream g[N];
	static uint8_t buf[VSOCK_BUF_ALLOC];
	struct hconn *hc[N];
	uint64_t sent = 0, reserved;
	long rss, bound_kib;
	size_t heap;

	CHECK(setup(&o, 0) == 0);
	big_lock();
	HA.accept_auto_read = false; /* the host reads nothing */
	big_unlock();
	rss = rss_kib();
	heap = heap_in_use();
	for (int i = 0; i < N; i++) {
		gs_init(&g[i], 36000 + i, HPORT, 65536);
		CHECK_EQ(gs_connect(&VA, &g[i]), 0);
		CHECK(g[i].peer_buf_alloc >= VSOCK_BUF_MIN && g[i].peer_buf_alloc <= VSOCK_BUF_ALLOC);
		CHECK(i == 0 || g[i].peer_buf_alloc <= g[i - 1].peer_buf_alloc);
		CHECK_EQ(gs_send_data(&VA, &g[i], 100 + i, g[i].peer_buf_alloc, true), 0);
		sent += g[i].peer_buf_alloc;
	}
	CHECK(WAIT_FOR(&VA, vd_tx_inflight(&VA) == 0, 2000));
	for (int i = 0; i < N; i++)
		CHECK((hc[i] = find_hc(&HA, g[i].gport)) != NULL);
	big_lock();
	reserved = HA.dev->rx_reserved;
	big_unlock();
	bound_kib = (long)(VSOCK_RX_BUDGET + (uint64_t)N * VSOCK_BUF_MIN) / 1024;
	fprintf(stderr, "  hoard: windows %u .. %u, %llu KiB buffered (bound %ld KiB), "
		"reserved %llu KiB\n", g[0].peer_buf_alloc, g[N - 1].peer_buf_alloc,
		(unsigned long long)sent / 1024, bound_kib, (unsigned long long)reserved / 1024);
	CHECK_EQ(g[0].peer_buf_alloc, VSOCK_BUF_ALLOC);
	CHECK_EQ(g[N - 1].peer_buf_alloc, VSOCK_BUF_MIN);
	CHECK(sent / 1024 <= (uint64_t)bound_kib);
	CHECK(sent >= VSOCK_RX_BUDGET / 2);
	/* gA's window is in the reservation too */
	CHECK(reserved >= sent && reserved <= sent + VSOCK_BUF_ALLOC);
	{
		/* what the allocator handed out, not RSS: an ASan build's shadow,
		 * redzones and quarantine add about a third on top */
		long grew = (long)(heap_in_use() - heap) / 1024;
		fprintf(stderr, "  hoard: heap +%ld KiB; RssAnon %ld -> %ld KiB\n", grew, rss,
			rss_kib());
		CHECK(grew < bound_kib + RSS_BOUND_KIB);
	}
	CHECK(bystanders_ok(14));
	/* the guest closes them all cleanly: what it sent is still held, and
	 * still counted, until the host reads it */
	for (int i = 0; i < N; i++)
		CHECK_EQ(gs_send_ctrl(&VA, &g[i], VIRTIO_VSOCK_OP_SHUTDOWN, VSOCK_SHUTDOWN_BOTH), 0);
	CHECK(WAIT_FOR(&VA, vd_tx_inflight(&VA) == 0 && a_nconns() == 1, 2000));
	big_lock();
	reserved = HA.dev->rx_reserved;
	big_unlock();
	CHECK(reserved >= sent && reserved <= sent + VSOCK_BUF_ALLOC);
	for (int i = 0; i < N; i++) {
		ssize_t n;
		big_lock();
		n = vsock_conn_read(hc[i]->c, buf, sizeof(buf));
		big_unlock();
		CHECK_EQ(n, g[i].peer_buf_alloc);
		CHECK(gen_check(100 + i, 0, buf, (size_t)n));
		big_lock();
		n = vsock_conn_read(hc[i]->c, buf, sizeof(buf));
		vsock_conn_close(hc[i]->c);
		hc[i]->c = NULL;
		big_unlock();
		CHECK_EQ(n, 0); /* EOF */
	}
	big_lock();
	reserved = HA.dev->rx_reserved;
	big_unlock();
	CHECK(reserved <= VSOCK_BUF_ALLOC); /* only gA's */
	big_lock();
	HA.accept_auto_read = true;
	big_unlock();
	CHECK(fresh_works(&HA, &VA, 30700));
	gs_init(&g[0], 30701, HPORT, 65536); /* and a new one has the full window again */
	CHECK_EQ(gs_connect(&VA, &g[0]), 0);
	CHECK_EQ(g[0].peer_buf_alloc, VSOCK_BUF_ALLOC);
	CHECK_EQ(HA.naccepted, N + 3);
	CHECK_EQ(a_nconns(), 3);
	teardown();
}

/* ------------------------------------------------------------------ 9 */

/* Packets sized to waste the host's buffers: 2049 bytes, so that no two
 * would share a 4 KiB chunk if each took its own.  What the device holds
 * stays within a chunk of what the guest sent, and all of it reads back in
 * order. */
static void t_odd_packets(void)
{
	struct vd_opts o = { .event_idx = true, .qsize = 256 };
	enum { LEN = 2049, N = 120 }; /* 240 KiB: within one window */
	static uint8_t buf[LEN * N];
	struct virtio_vsock_hdr h;
	struct gstream g;
	struct hconn *hc;
	size_t heap;
	ssize_t n;
	long grew;

	CHECK(setup(&o, 0) == 0);
	big_lock();
	HA.accept_auto_read = false; /* the host reads nothing until the end */
	big_unlock();
	gs_init(&g, 30800, HPORT, 65536);
	CHECK_EQ(gs_connect(&VA, &g), 0);
	CHECK(WAIT_FOR(&VA, (hc = find_hc(&HA, g.gport)) != NULL, 1000));
	gen_fill(7, 0, buf, sizeof(buf));
	heap = heap_in_use();
	for (int i = 0; i < N; i++) {
		vd_hdr(&VA, &h, g.gport, HPORT, VIRTIO_VSOCK_OP_RW, LEN, g.buf_alloc, g.fwd_cnt);
		CHECK_EQ(vd_send(&VA, &h, buf + i * LEN, LEN, VD_HDR_PAYLOAD), 0);
	}
	CHECK(WAIT_FOR(&VA, vd_tx_inflight(&VA) == 0, 2000));
	grew = (long)(heap_in_use() - heap);
	fprintf(stderr, "  odd packets: %d x %d bytes buffered, heap +%ld bytes\n", N, LEN, grew);
	CHECK(grew < N * LEN + 16384); /* a chunk per packet: twice that */
	memset(buf, 0, sizeof(buf));
	big_lock();
	n = vsock_conn_read(hc->c, buf, sizeof(buf));
	big_unlock();
	CHECK_EQ(n, N * LEN);
	CHECK(gen_check(7, 0, buf, sizeof(buf)));
	CHECK(bystanders_ok(16));
	teardown();
}

int main(void)
{
	int fails = 0;

	signal(SIGPIPE, SIG_DFL);
	log_verbosity = getenv("VSOCK_DEBUG") ? LOG_DEBUG : LOG_ERR;
	fails += run_test("bad_chains_tx_loop_and_rx_buffers", t_bad_chains);
	fails += run_test("wrong_source_cid", t_wrong_cid);
	fails += run_test("request_flood", t_request_flood);
	fails += run_test("credit_lies", t_credit_lies);
	fails += run_test("rx_never_read", t_rx_never_read);
	fails += run_test("packets_after_rst", t_after_rst);
	fails += run_test("credit_overrun", t_overrun);
	fails += run_test("hoarding_guest_bounded_by_budget", t_hoard);
	fails += run_test("odd_sized_packets_share_buffers", t_odd_packets);
	fprintf(stderr, "%d failed\n", fails);
	return fails ? 1 : 0;
}
