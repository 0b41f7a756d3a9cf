/* vhost-user frontend lifecycle: disconnect resets every connection with
 * ECONNRESET and the next frontend is served; a guest driver reset (rings
 * stopped) does the same; vsock_dev_free tells every connection; protocol
 * odds (unknown requests, bad memory tables, a second frontend). */
#include "config.h"

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "log.h"
#include "util.h"
#include "vsock/vhost_user.h"
#include "vsock_testlib.h"

static struct host H;
static struct vd V;
static const struct vd_opts O = { .event_idx = true, .indirect = true, .reply_ack = true };

static bool still_serving(uint32_t gport)
{
	static struct gstream g;
	unsigned before = H.naccepted;

	gs_registry_reset(); /* earlier streams are gone with their frontend */
	gs_init(&g, gport, 1200, 65536);
	H.accept_auto_read = true;
	H.accept_seed = 4;
	if (gs_connect(&V, &g) != 0)
		return false;
	if (!WAIT_FOR(&V, H.naccepted == before + 1, 1000))
		return false;
	if (gs_send_data(&V, &g, 4, 300000, true) != 0)
		return false;
	return WAIT_FOR(&V, H.accepted[before]->rx_bytes == 300000, 2000) &&
	       !H.accepted[before]->rx_bad;
}

/* three guest-initiated and one host-initiated connection */
static int open_conns(struct hconn *out)
{
	static struct gstream g[3], gh;
	struct vd_pkt p;

	for (int i = 0; i < 3; i++) {
		gs_init(&g[i], 61000 + i, 1024, 65536);
		if (gs_connect(&V, &g[i]) != 0)
			return -1;
	}
	big_lock();
	out->c = vsock_connect(H.dev, 3333, &hconn_ops, out);
	big_unlock();
	if (!out->c)
		return -1;
	for (int i = 0; i < 100; i++) {
		if (vd_recv(&V, &p, 10) < 0)
			continue;
		if (p.hdr.op == VIRTIO_VSOCK_OP_REQUEST) {
			gs_init(&gh, 3333, p.hdr.src_port, 65536);
			free(p.data);
			gs_send_ctrl(&V, &gh, VIRTIO_VSOCK_OP_RESPONSE, 0);
			return WAIT_FOR(&V, out->established, 1000) ? 0 : -1;
		}
		free(p.data);
	}
	return -1;
}

static void t_disconnect_resets_and_reconnects(void)
{
	struct hconn hc = { 0 };

	CHECK(host_start(&H, 0) == 0);
	CHECK(vd_open(&V, H.path, &O) == 0);
	CHECK_EQ(open_conns(&hc), 0);
	CHECK(WAIT_FOR(&V, H.naccepted == 3, 1000));
	vd_close(&V); /* QEMU exits */
	CHECK(WAIT_FOR(NULL, hc.closed && H.accepted[0]->closed && H.accepted[1]->closed &&
				     H.accepted[2]->closed, 2000));
	CHECK_EQ(hc.err, ECONNRESET);
	for (int i = 0; i < 3; i++)
		CHECK_EQ(H.accepted[i]->err, ECONNRESET);
	big_lock();
	CHECK(!vsock_dev_ready(H.dev));
	char b[4];
	CHECK_EQ(vsock_conn_read(hc.c, b, 4), -ECONNRESET);
	CHECK_EQ(vsock_conn_write(hc.c, b, 4), -ECONNRESET);
	vsock_conn_close(hc.c);
	big_unlock();
	/* QEMU restarts */
	CHECK(vd_open(&V, H.path, &O) == 0);
	CHECK(WAIT_FOR(&V, vsock_dev_ready(H.dev), 1000));
	CHECK(still_serving(62000));
	vd_close(&V);
	host_stop(&H);
}

/* The guest driver resets: QEMU disables and stops the rings
 * (SET_VRING_ENABLE 0, GET_VRING_BASE). */
static void t_ring_stop_resets(void)
{
	struct hconn hc = { 0 };
	struct vhost_user_vring_state st;
	int r;

	CHECK(host_start(&H, 0) == 0);
	CHECK(vd_open(&V, H.path, &O) == 0);
	CHECK_EQ(open_conns(&hc), 0);
	for (unsigned i = 0; i < 2; i++) {
		st.index = i;
		st.num = 0;
		CHECK(vd_msg(&V, VHOST_USER_SET_VRING_ENABLE, 0, &st, sizeof(st), NULL, 0, NULL, 0) == 0);
	}
	CHECK(WAIT_FOR(NULL, hc.closed && H.accepted[0]->closed, 1000));
	CHECK_EQ(hc.err, ECONNRESET);
	for (unsigned i = 0; i < 2; i++) {
		struct vhost_user_vring_state rep = { 0 };
		st.index = i;
		r = vd_msg(&V, VHOST_USER_GET_VRING_BASE, 0, &st, sizeof(st), NULL, 0, &rep,
			   sizeof(rep));
		CHECK_EQ(r, (int)sizeof(rep));
		CHECK_EQ(rep.index, i);
		/* the base is where the device stopped consuming */
		CHECK_EQ(rep.num, i == 0 ? V.rx.last_used : V.tx.avail_idx);
	}
	big_lock();
	CHECK(!vsock_dev_ready(H.dev));
	vsock_conn_close(hc.c);
	big_unlock();
	vd_close(&V);
	CHECK(vd_open(&V, H.path, &O) == 0);
	CHECK(still_serving(62100));
	vd_close(&V);
	host_stop(&H);
}

static void t_dev_free_tells_everyone(void)
{
	struct hconn hc = { 0 };
	struct pollfd p;
	char c;

	CHECK(host_start(&H, 0) == 0);
	CHECK(vd_open(&V, H.path, &O) == 0);
	CHECK_EQ(open_conns(&hc), 0);
	CHECK(WAIT_FOR(&V, H.naccepted == 3, 1000));
	H.accepted[1]->close_on_closed = true;
	big_lock();
	vsock_dev_free(H.dev);
	H.dev = NULL;
	/* synchronously, before vsock_dev_free returned */
	CHECK(hc.closed && hc.err == ECONNRESET);
	for (int i = 0; i < 3; i++)
		CHECK(H.accepted[i]->closed && H.accepted[i]->err == ECONNRESET);
	CHECK_EQ(vsock_conn_write(hc.c, "x", 1), -ECONNRESET);
	vsock_conn_close(hc.c); /* detached conns are still closed by the host */
	big_unlock();
	p.fd = V.sock;
	p.events = POLLIN;
	CHECK(poll(&p, 1, 1000) == 1);
	CHECK(read(V.sock, &c, 1) == 0); /* the frontend sees EOF */
	CHECK(access(H.path, F_OK) < 0); /* socket removed */
	vd_close(&V);
	host_stop(&H);
}

static void t_protocol_odds(void)
{
	uint64_t ack = 0, u = 0;
	int r;

	CHECK(host_start(&H, 0) == 0);
	CHECK(vd_open(&V, H.path, &O) == 0);
	/* an unknown request with NEED_REPLY gets a failure ack */
	r = vd_msg(&V, 77, VHOST_USER_NEED_REPLY_MASK, &u, 8, NULL, 0, &ack, sizeof(ack));
	CHECK_EQ(r, 8);
	CHECK(ack != 0);
	/* SET_MEM_TABLE with fewer fds than regions: refused, old table kept */
	struct {
		uint32_t n, pad;
		uint64_t r[4];
	} mt = { 1, 0, { VD_GPA_BASE, 4096, 0, 0 } };
	r = vd_msg(&V, VHOST_USER_SET_MEM_TABLE, VHOST_USER_NEED_REPLY_MASK, &mt, sizeof(mt),
		   NULL, 0, &ack, sizeof(ack));
	CHECK_EQ(r, 8);
	CHECK(ack != 0);
	/* a ring size that is not a power of two: refused */
	struct vhost_user_vring_state st = { 0, 100 };
	r = vd_msg(&V, VHOST_USER_SET_VRING_NUM, VHOST_USER_NEED_REPLY_MASK, &st, sizeof(st),
		   NULL, 0, &ack, sizeof(ack));
	CHECK_EQ(r, 8);
	CHECK(ack != 0);
	/* a config read past guest_cid: failure is a zero-size reply */
	struct {
		uint32_t off, size, flags;
		uint8_t b[8];
	} __attribute__((packed)) cfg = { 4, 8, 0, { 0 } }, rep;
	r = vd_msg(&V, VHOST_USER_GET_CONFIG, 0, &cfg, sizeof(cfg), NULL, 0, &rep, sizeof(rep));
	CHECK_EQ(r, 0);
	CHECK(still_serving(62200));
	/* a second frontend waits until the first is gone */
	struct vd v2;
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int s2 = socket(AF_UNIX, SOCK_STREAM, 0);
	strcpy(sa.sun_path, H.path);
	CHECK(connect(s2, (struct sockaddr *)&sa, sizeof(sa)) == 0);
	uint8_t hdr[12] = { 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0 }; /* GET_FEATURES */
	CHECK(write(s2, hdr, 12) == 12);
	struct pollfd p = { s2, POLLIN, 0 };
	CHECK(poll(&p, 1, 200) == 0); /* not served while V is connected */
	close(s2);
	CHECK(still_serving(62201));
	vd_close(&V);
	CHECK(vd_open(&v2, H.path, &O) == 0);
	vd_close(&v2);
	/* garbage: a message claiming a huge payload drops that frontend only */
	s2 = socket(AF_UNIX, SOCK_STREAM, 0);
	CHECK(connect(s2, (struct sockaddr *)&sa, sizeof(sa)) == 0);
	uint8_t big[12] = { 5, 0, 0, 0, 1, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f };
	CHECK(write(s2, big, 12) == 12);
	p.fd = s2;
	CHECK(poll(&p, 1, 1000) == 1);
	char c;
	CHECK(read(s2, &c, 1) == 0);
	close(s2);
	CHECK(vd_open(&V, H.path, &O) == 0);
	CHECK(still_serving(62202));
	vd_close(&V);
	host_stop(&H);
}

/* An old frontend that never acks VHOST_USER_F_PROTOCOL_FEATURES in
 * SET_FEATURES gets enabled rings without SET_VRING_ENABLE. */
static void t_rings_enabled_without_protocol_features(void)
{
	struct vd_opts o = { 0 };

	CHECK(host_start(&H, 0) == 0);
	CHECK(vd_open(&V, H.path, &o) == 0);
	/* vd_open sends SET_VRING_ENABLE anyway; simulate the old frontend by
	 * disabling, then SET_FEATURES without bit 30 enables */
	struct vhost_user_vring_state st;
	for (unsigned i = 0; i < 2; i++) {
		st.index = i;
		st.num = 0;
		CHECK(vd_msg(&V, VHOST_USER_SET_VRING_ENABLE, 0, &st, sizeof(st), NULL, 0, NULL, 0) == 0);
	}
	CHECK(WAIT_FOR(&V, !vsock_dev_ready(H.dev), 1000));
	uint64_t f = 1ull << 32;
	CHECK(vd_msg(&V, VHOST_USER_SET_FEATURES, 0, &f, 8, NULL, 0, NULL, 0) == 0);
	CHECK(WAIT_FOR(&V, vsock_dev_ready(H.dev), 1000));
	CHECK(still_serving(62300));
	vd_close(&V);
	host_stop(&H);
}

int main(void)
{
	int fails = 0;

	signal(SIGPIPE, SIG_DFL);
	log_verbosity = getenv("VSOCK_DEBUG") ? LOG_DEBUG : LOG_ERR;
	fails += run_test("disconnect_resets_and_reconnects", t_disconnect_resets_and_reconnects);
	fails += run_test("ring_stop_resets", t_ring_stop_resets);
	fails += run_test("dev_free_tells_everyone", t_dev_free_tells_everyone);
	fails += run_test("protocol_odds", t_protocol_odds);
	fails += run_test("rings_enabled_without_protocol_features",
			  t_rings_enabled_without_protocol_features);
	fprintf(stderr, "%d failed\n", fails);
	return fails ? 1 : 0;
}
