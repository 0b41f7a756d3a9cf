/* See vsock_testlib.h. */
#include "config.h"

#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "util.h"
#include "vsock_testlib.h"

int t_failures;
const char *t_current = "";

/* Fixtures still open, so that run_test closes what a failing CHECK left
 * behind (its early return skips the test's own teardown): the device, its
 * loop thread and its socket file. */
static struct {
	struct host *h;
	struct vd *v; /* attached by fixture_open; NULL for host_start alone */
} open_fx[8];

static void fx_track(struct host *h, struct vd *v, bool on)
{
	unsigned i;

	for (i = 0; i < ARRAY_SIZE(open_fx) && open_fx[i].h != h; i++)
		;
	if (i == ARRAY_SIZE(open_fx) && on) /* new: the first free slot */
		for (i = 0; i < ARRAY_SIZE(open_fx) && open_fx[i].h; i++)
			;
	if (i == ARRAY_SIZE(open_fx))
		return;
	open_fx[i].h = on ? h : NULL;
	open_fx[i].v = on ? v : NULL;
}

void gen_fill(uint32_t seed, uint64_t off, uint8_t *buf, size_t len)
{
	for (size_t i = 0; i < len; i++)
		buf[i] = gen_byte(seed, off + i);
}

bool gen_check(uint32_t seed, uint64_t off, const uint8_t *buf, size_t len)
{
	for (size_t i = 0; i < len; i++)
		if (buf[i] != gen_byte(seed, off + i))
			return false;
	return true;
}

/* ---- host callbacks (loop thread, big lock held) ---- */

static void h_established(struct vsock_conn *c, void *arg)
{
	struct hconn *hc = arg;
	hc->established = true;
	hconn_pump_tx(hc);
}

static void h_readable(struct vsock_conn *c, void *arg)
{
	struct hconn *hc = arg;
	uint8_t buf[16384];
	ssize_t n;

	hc->readable_calls++;
	if (!hc->auto_read)
		return;
	while ((n = vsock_conn_read(c, buf, sizeof(buf))) > 0) {
		if (!gen_check(hc->rx_seed, hc->rx_bytes, buf, (size_t)n))
			hc->rx_bad = true;
		hc->rx_bytes += (uint64_t)n;
	}
	if (n == 0)
		hc->eof = true;
}

void hconn_pump_tx(struct hconn *hc)
{
	uint8_t buf[32768];

	while (hc->tx_done < hc->tx_total) {
		size_t len = (size_t)MIN(sizeof(buf), hc->tx_total - hc->tx_done);
		ssize_t n;
		gen_fill(hc->tx_seed, hc->tx_done, buf, len);
		n = vsock_conn_write(hc->c, buf, len);
		if (n <= 0)
			return;
		hc->tx_done += (uint64_t)n;
	}
	if (hc->tx_total && hc->tx_done == hc->tx_total) {
		if (hc->tx_close_after) {
			hc->tx_close_after = false;
			vsock_conn_close(hc->c);
			hc->c = NULL;
		} else if (hc->tx_shut_after) {
			hc->tx_shut_after = false;
			vsock_conn_shutdown(hc->c, SHUT_WR);
		}
	}
}

static void h_writable(struct vsock_conn *c, void *arg)
{
	struct hconn *hc = arg;
	hc->writable_calls++;
	if (hc->c)
		hconn_pump_tx(hc);
}

static void h_closed(struct vsock_conn *c, void *arg, int err)
{
	struct hconn *hc = arg;
	hc->closed = true;
	hc->err = err;
	if (hc->close_on_closed) {
		vsock_conn_close(c);
		hc->c = NULL;
	}
}

/* Direct delivery: take up to deliver_max bytes of each packet straight
 * from guest memory (auto_read endpoints only), verifying them in order. */
static size_t h_deliver(struct vsock_conn *c, void *arg, const struct iovec *iov, int cnt,
			size_t len)
{
	struct hconn *hc = arg;
	size_t take = MIN(len, (size_t)hc->deliver_max), done = 0;

	if (!hc->auto_read)
		return 0;
	for (int i = 0; i < cnt && done < take; i++) {
		size_t n = MIN(iov[i].iov_len, take - done);
		if (!gen_check(hc->rx_seed, hc->rx_bytes, iov[i].iov_base, n))
			hc->rx_bad = true;
		hc->rx_bytes += n;
		done += n;
	}
	hc->delivered += done;
	return done;
}

const struct vsock_conn_ops hconn_ops = {
	.established = h_established,
	.readable = h_readable,
	.writable = h_writable,
	.closed = h_closed,
	.deliver = h_deliver,
};

static int h_accept(void *arg, struct vsock_conn *c, uint32_t host_port, uint32_t guest_port)
{
	struct host *h = arg;
	struct hconn *hc;

	if (h->accept_ret < 0 || h->naccepted == HOST_MAX_ACCEPT)
		return h->accept_ret < 0 ? h->accept_ret : -ENOBUFS;
	hc = calloc(1, sizeof(*hc));
	hc->c = c;
	hc->host_port = host_port;
	hc->guest_port = guest_port;
	hc->established = true;
	hc->auto_read = h->accept_auto_read;
	hc->rx_seed = h->accept_seed;
	hc->deliver_max = h->accept_deliver_max;
	h->accepted[h->naccepted++] = hc;
	vsock_conn_set_ops(c, &hconn_ops, hc);
	return 0;
}

int host_start(struct host *h, unsigned max_conns)
{
	static unsigned n;
	struct vsock_dev_config cfg = { 0 };

	memset(h, 0, sizeof(*h));
	gs_registry_reset();
	snprintf(h->path, sizeof(h->path), "/tmp/vsock-test-%d-%u.sock", getpid(), n++);
	h->cid = 3 + n;
	h->loop = loop_new();
	if (!h->loop)
		return -ENOMEM;
	cfg.guest_cid = h->cid;
	cfg.socket_path = h->path;
	cfg.max_conns = max_conns;
	cfg.accept = h_accept;
	cfg.accept_arg = h;
	cfg.close_timeout_ms = 300; /* keep the timeout tests quick */
	cfg.connect_timeout_ms = 500;
	big_lock();
	h->dev = vsock_dev_new(h->loop, &cfg);
	big_unlock();
	if (!h->dev)
		return -errno;
	fx_track(h, NULL, true);
	return loop_start(h->loop);
}

void host_stop(struct host *h)
{
	big_lock();
	if (h->dev)
		vsock_dev_free(h->dev);
	h->dev = NULL;
	for (unsigned i = 0; i < h->naccepted; i++) {
		if (h->accepted[i]->c)
			vsock_conn_close(h->accepted[i]->c);
		free(h->accepted[i]);
	}
	big_unlock();
	loop_stop(h->loop);
	loop_free(h->loop);
	unlink(h->path);
	fx_track(h, NULL, false);
}

int fixture_open(struct host *h, struct vd *v, unsigned max_conns, const struct vd_opts *o)
{
	int r = host_start(h, max_conns);

	if (r < 0)
		return r;
	r = vd_open(v, h->path, o);
	if (r < 0)
		fprintf(stderr, "vd_open: %s\n", strerror(-r));
	else
		fx_track(h, v, true);
	return r;
}

void fixture_close(struct host *h, struct vd *v)
{
	vd_close(v);
	host_stop(h);
}

/* ---- guest streams ---- */

/* every stream of the current test, so that any pump routes every packet */
static struct gstream *registry[HOST_MAX_ACCEPT];
static unsigned nregistry;

void gs_registry_reset(void)
{
	nregistry = 0;
}

void gs_init(struct gstream *g, uint32_t gport, uint32_t hport, uint32_t buf_alloc)
{
	unsigned i;

	for (i = 0; i < nregistry && registry[i] != g; i++)
		;
	if (i == nregistry && nregistry < ARRAY_SIZE(registry))
		registry[nregistry++] = g;
	memset(g, 0, sizeof(*g));
	g->gport = gport;
	g->hport = hport;
	g->buf_alloc = buf_alloc;
	g->credit_updates = true;
}

static uint32_t gs_credit(const struct gstream *g)
{
	uint32_t inflight = g->tx_cnt - g->peer_fwd_cnt;
	return inflight >= g->peer_buf_alloc ? 0 : g->peer_buf_alloc - inflight;
}

int gs_send_ctrl(struct vd *v, struct gstream *g, uint16_t op, uint32_t flags)
{
	struct virtio_vsock_hdr h;

	vd_hdr(v, &h, g->gport, g->hport, op, 0, g->buf_alloc, g->fwd_cnt);
	h.flags = flags;
	g->fwd_sent = g->fwd_cnt;
	return vd_send(v, &h, NULL, 0, VD_HDR_PAYLOAD);
}

bool gs_handle(struct vd *v, struct gstream *g, const struct vd_pkt *p)
{
	if (p->hdr.src_port != g->hport || p->hdr.dst_port != g->gport)
		return false;
	if (p->hdr.src_cid != 2 || p->hdr.dst_cid != v->cid) {
		fprintf(stderr, "guest: packet with cids %llu -> %llu\n",
			(unsigned long long)p->hdr.src_cid, (unsigned long long)p->hdr.dst_cid);
		g->rx_bad = true;
	}
	g->peer_buf_alloc = p->hdr.buf_alloc;
	g->peer_fwd_cnt = p->hdr.fwd_cnt;
	switch (p->hdr.op) {
	case VIRTIO_VSOCK_OP_RESPONSE:
		g->established = true;
		break;
	case VIRTIO_VSOCK_OP_RST:
		g->rst = true;
		break;
	case VIRTIO_VSOCK_OP_RW:
		if (g->rx_cnt - g->fwd_cnt + p->len > g->buf_alloc) {
			fprintf(stderr, "guest: host overran credit\n");
			g->rx_bad = true;
		}
		if (!g->nocheck && !gen_check(g->rx_seed, g->rx_bytes, p->data, p->len))
			g->rx_bad = true;
		if (g->rx_keep && g->rx_bytes + p->len <= g->rx_keep_cap)
			memcpy(g->rx_keep + g->rx_bytes, p->data, p->len);
		g->rx_bytes += p->len;
		g->rx_cnt += p->len;
		g->fwd_cnt += p->len; /* the "application" reads at once */
		if (g->credit_updates && g->fwd_cnt - g->fwd_sent >= g->buf_alloc / 2)
			gs_send_ctrl(v, g, VIRTIO_VSOCK_OP_CREDIT_UPDATE, 0);
		break;
	case VIRTIO_VSOCK_OP_SHUTDOWN:
		g->shut_flags |= p->hdr.flags;
		if (p->hdr.flags & VIRTIO_VSOCK_SHUTDOWN_SEND)
			g->peer_shut_send = true;
		if (p->hdr.flags & VIRTIO_VSOCK_SHUTDOWN_RCV)
			g->peer_shut_rcv = true;
		break;
	case VIRTIO_VSOCK_OP_CREDIT_REQUEST:
		gs_send_ctrl(v, g, VIRTIO_VSOCK_OP_CREDIT_UPDATE, 0);
		break;
	default:
		break;
	}
	return true;
}

void gs_pump(struct vd *v, struct gstream **gs, unsigned n, int ms, unsigned *stray)
{
	struct vd_pkt p;

	if (!gs) {
		gs = registry;
		n = nregistry;
	}
	while (vd_recv(v, &p, ms) == 0) {
		bool used = false;
		for (unsigned i = 0; i < n && !used; i++)
			used = gs_handle(v, gs[i], &p);
		if (!used && stray)
			(*stray)++;
		free(p.data);
		ms = 0;
	}
}

int gs_connect(struct vd *v, struct gstream *g)
{
	int r = gs_send_ctrl(v, g, VIRTIO_VSOCK_OP_REQUEST, 0);

	for (int i = 0; r == 0 && i < 200 && !g->established && !g->rst; i++)
		gs_pump(v, NULL, 0, 10, NULL);
	if (r < 0)
		return r;
	return g->established ? 0 : g->rst ? -ECONNREFUSED : -ETIMEDOUT;
}

int gs_send_data(struct vd *v, struct gstream *g, uint32_t seed, uint64_t len, bool rotate)
{
	static const enum vd_layout layouts[] = { VD_HDR_PAYLOAD, VD_ONE, VD_SPLIT_HDR,
						  VD_SCATTER, VD_INDIRECT };
	uint8_t buf[65536];
	uint64_t off = 0;
	unsigned k = 0, idle = 0;

	while (off < len) {
		uint32_t credit = gs_credit(g), n;
		struct virtio_vsock_hdr h;
		enum vd_layout lay = rotate ? layouts[k++ % ARRAY_SIZE(layouts)] : VD_HDR_PAYLOAD;
		int r;

		if (g->rst)
			return -ECONNRESET;
		if (credit == 0) {
			/* a Linux guest waits here for the host's CREDIT_UPDATE; it
			 * does not ask with CREDIT_REQUEST */
			gs_pump(v, NULL, 0, 5, NULL);
			if (++idle > 1000)
				return -ETIMEDOUT;
			continue;
		}
		idle = 0;
		n = (uint32_t)MIN((uint64_t)MIN(credit, 65536u), len - off);
		if (lay == VD_INDIRECT && !(v->features & (1ull << 28)))
			lay = VD_SCATTER;
		gen_fill(seed, off, buf, n);
		vd_hdr(v, &h, g->gport, g->hport, VIRTIO_VSOCK_OP_RW, n, g->buf_alloc, g->fwd_cnt);
		g->fwd_sent = g->fwd_cnt;
		r = vd_send(v, &h, buf, n, lay);
		if (r < 0)
			return r;
		g->tx_cnt += n;
		off += n;
		gs_pump(v, NULL, 0, 0, NULL);
	}
	return 0;
}

int run_test(const char *name, void (*fn)(void))
{
	int before = t_failures;
	struct timespec a, b;

	t_current = name;
	clock_gettime(CLOCK_MONOTONIC, &a);
	fn();
	clock_gettime(CLOCK_MONOTONIC, &b);
	for (unsigned i = 0; i < ARRAY_SIZE(open_fx); i++) {
		if (!open_fx[i].h)
			continue;
		fprintf(stderr, "  %s left a fixture open (a CHECK failed): closing it\n", name);
		if (open_fx[i].v)
			vd_close(open_fx[i].v);
		host_stop(open_fx[i].h);
	}
	fprintf(stderr, "%s %s (%.0f ms)\n", t_failures == before ? "PASS" : "FAIL", name,
		(b.tv_sec - a.tv_sec) * 1e3 + (b.tv_nsec - a.tv_nsec) / 1e6);
	return t_failures == before ? 0 : 1;
}

void vd_poll_or_sleep(struct vd *v)
{
	if (v && v->sock >= 0)
		vd_poll(v, 1);
	else
		usleep(1000);
}
