/* virtio-vsock protocol tests: handshake, connects both ways, data with
 * credit flow control, half-close, RST rules, limits.  The test process is
 * the guest (vsock_driver) and the host (the device in a loop thread). */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "log.h"
#include "util.h"
#include "vsock_testlib.h"

static struct host H;
static struct vd V;

static int setup(unsigned max_conns, const struct vd_opts *o)
{
	struct vd_opts def = { .event_idx = true, .indirect = true, .reply_ack = true };

	return fixture_open(&H, &V, max_conns, o ? o : &def);
}

static void teardown(void)
{
	fixture_close(&H, &V);
}

/* No packet at all arrives within ms. */
static bool quiet(int ms)
{
	struct vd_pkt p;

	if (vd_recv(&V, &p, ms) == 0) {
		fprintf(stderr, "unexpected packet op %u %u->%u\n", p.hdr.op, p.hdr.src_port,
			p.hdr.dst_port);
		free(p.data);
		return false;
	}
	return true;
}

static void t_handshake_cid(void)
{
	CHECK(setup(0, NULL) == 0);
	CHECK_EQ(V.cid, H.cid);
	CHECK(WAIT_FOR(&V, vsock_dev_ready(H.dev), 2000));
	/* ask again, like QEMU does after realize */
	uint64_t cid = 0;
	CHECK(vd_get_config_cid(&V, &cid) == 0);
	CHECK_EQ(cid, H.cid);
	teardown();
}

static void t_guest_connect_accepted(void)
{
	struct gstream g;

	CHECK(setup(0, NULL) == 0);
	gs_init(&g, 40000, 1024, 65536);
	CHECK_EQ(gs_connect(&V, &g), 0);
	CHECK(WAIT_FOR(&V, H.naccepted == 1, 1000));
	CHECK_EQ(H.accepted[0]->host_port, 1024);
	CHECK_EQ(H.accepted[0]->guest_port, 40000);
	CHECK_EQ(g.peer_buf_alloc, 256 * 1024);
	teardown();
}

static void t_guest_connect_refused(void)
{
	struct gstream g;

	CHECK(setup(0, NULL) == 0);
	H.accept_ret = -ECONNREFUSED;
	gs_init(&g, 40001, 1025, 65536);
	CHECK_EQ(gs_connect(&V, &g), -ECONNREFUSED);
	CHECK_EQ(H.naccepted, 0);
	teardown();
}

/* Guest side of a host-initiated connect: wait for REQUEST on port. */
static int guest_wait_request(uint32_t port, struct vd_pkt *out)
{
	for (int i = 0; i < 200; i++) {
		struct vd_pkt p;
		if (vd_recv(&V, &p, 10) < 0)
			continue;
		if (p.hdr.op == VIRTIO_VSOCK_OP_REQUEST && p.hdr.dst_port == port) {
			*out = p;
			return 0;
		}
		free(p.data);
	}
	return -ETIMEDOUT;
}

static void t_host_connect_established(void)
{
	struct hconn hc = { 0 };
	struct vd_pkt req;
	struct gstream g;

	CHECK(setup(0, NULL) == 0);
	CHECK(WAIT_FOR(&V, vsock_dev_ready(H.dev), 2000));
	big_lock();
	hc.c = vsock_connect(H.dev, 2000, &hconn_ops, &hc);
	big_unlock();
	CHECK(hc.c != NULL);
	CHECK_EQ(guest_wait_request(2000, &req), 0);
	CHECK(req.hdr.src_port >= 49152);
	CHECK_EQ(req.hdr.type, VIRTIO_VSOCK_TYPE_STREAM);
	CHECK_EQ(req.hdr.src_cid, 2);
	CHECK_EQ(req.hdr.dst_cid, H.cid);
	big_lock();
	CHECK_EQ(vsock_conn_local_port(hc.c), req.hdr.src_port);
	CHECK_EQ(vsock_conn_peer_port(hc.c), 2000);
	big_unlock();
	gs_init(&g, 2000, req.hdr.src_port, 65536);
	free(req.data);
	CHECK_EQ(gs_send_ctrl(&V, &g, VIRTIO_VSOCK_OP_RESPONSE, 0), 0);
	CHECK(WAIT_FOR(&V, hc.established, 1000));
	CHECK(!hc.closed);
	/* a second connect to the same guest port gets a different host port */
	struct hconn hc2 = { 0 };
	big_lock();
	hc2.c = vsock_connect(H.dev, 2000, &hconn_ops, &hc2);
	big_unlock();
	CHECK_EQ(guest_wait_request(2000, &req), 0);
	CHECK(req.hdr.src_port != g.hport);
	free(req.data);
	big_lock();
	vsock_conn_close(hc.c);
	vsock_conn_close(hc2.c);
	big_unlock();
	teardown();
}

static void t_host_connect_refused(void)
{
	struct hconn hc = { 0 };
	struct vd_pkt req;
	struct gstream g;

	CHECK(setup(0, NULL) == 0);
	CHECK(WAIT_FOR(&V, vsock_dev_ready(H.dev), 2000));
	big_lock();
	hc.c = vsock_connect(H.dev, 2001, &hconn_ops, &hc);
	big_unlock();
	CHECK_EQ(guest_wait_request(2001, &req), 0);
	gs_init(&g, 2001, req.hdr.src_port, 65536);
	free(req.data);
	CHECK_EQ(gs_send_ctrl(&V, &g, VIRTIO_VSOCK_OP_RST, 0), 0);
	CHECK(WAIT_FOR(&V, hc.closed, 1000));
	CHECK_EQ(hc.err, ECONNREFUSED);
	CHECK(!hc.established);
	/* never RST in answer to RST */
	CHECK(quiet(100));
	big_lock();
	vsock_conn_close(hc.c);
	big_unlock();
	teardown();
}

static void t_host_connect_without_frontend(void)
{
	struct vsock_conn *c;

	CHECK(host_start(&H, 0) == 0);
	big_lock();
	CHECK(!vsock_dev_ready(H.dev));
	errno = 0;
	c = vsock_connect(H.dev, 2000, &hconn_ops, NULL);
	big_unlock();
	CHECK(c == NULL);
	CHECK_EQ(errno, ENOTCONN);
	host_stop(&H);
}

/* 4 MiB guest -> host with every descriptor layout; the guest never sends
 * CREDIT_REQUEST, so this only finishes if the device sends CREDIT_UPDATE on
 * its own as the host reads (16x its 256 KiB buf_alloc). */
static void t_data_guest_to_host(void)
{
	const uint64_t total = 4u << 20;
	struct gstream g;

	CHECK(setup(0, NULL) == 0);
	H.accept_auto_read = true;
	H.accept_seed = 77;
	gs_init(&g, 40010, 1024, 65536);
	CHECK_EQ(gs_connect(&V, &g), 0);
	CHECK_EQ(gs_send_data(&V, &g, 77, total, true), 0);
	CHECK(WAIT_FOR(&V, H.accepted[0]->rx_bytes == total, 5000));
	CHECK(!H.accepted[0]->rx_bad);
	CHECK(!H.accepted[0]->eof);
	/* half-close: EOF after the data, the other direction still works */
	CHECK_EQ(gs_send_ctrl(&V, &g, VIRTIO_VSOCK_OP_SHUTDOWN, VIRTIO_VSOCK_SHUTDOWN_SEND), 0);
	CHECK(WAIT_FOR(&V, H.accepted[0]->eof, 1000));
	g.rx_seed = 5;
	big_lock();
	H.accepted[0]->tx_seed = 5;
	H.accepted[0]->tx_total = 100000;
	hconn_pump_tx(H.accepted[0]);
	big_unlock();
	for (int i = 0; i < 200 && g.rx_bytes < 100000; i++)
		gs_pump(&V, NULL, 0, 10, NULL);
	CHECK_EQ(g.rx_bytes, 100000);
	CHECK(!g.rx_bad);
	CHECK(!g.rst);
	teardown();
}

/* Direct delivery from guest memory.  An endpoint that takes only part of
 * each packet: the rest is buffered and read after it, in order.  One that
 * takes everything: nothing is buffered, readable never fires.  Either way
 * the guest gets all of its credit back. */
static void t_data_guest_to_host_direct(void)
{
	const uint64_t total = 4u << 20;
	struct gstream g1, g2;
	struct hconn *part, *all;

	CHECK(setup(0, NULL) == 0);
	H.accept_auto_read = true;
	H.accept_seed = 78;
	H.accept_deliver_max = 1000;
	gs_init(&g1, 40011, 1025, 65536);
	CHECK_EQ(gs_connect(&V, &g1), 0);
	H.accept_deliver_max = UINT32_MAX;
	gs_init(&g2, 40012, 1025, 65536);
	CHECK_EQ(gs_connect(&V, &g2), 0);
	CHECK(WAIT_FOR(&V, H.naccepted == 2, 1000));
	part = H.accepted[0];
	all = H.accepted[1];

	CHECK_EQ(gs_send_data(&V, &g1, 78, total, true), 0);
	CHECK(WAIT_FOR(&V, part->rx_bytes == total, 5000));
	CHECK(!part->rx_bad);
	CHECK(part->delivered > 0 && part->delivered < total);
	CHECK(part->readable_calls > 0);

	CHECK_EQ(gs_send_data(&V, &g2, 78, total, true), 0);
	CHECK(WAIT_FOR(&V, all->rx_bytes == total, 5000));
	CHECK(!all->rx_bad);
	CHECK_EQ(all->delivered, total);
	CHECK_EQ(all->readable_calls, 0);

	/* the credit the device reports counts every byte taken either way */
	CHECK_EQ(gs_send_ctrl(&V, &g1, VIRTIO_VSOCK_OP_CREDIT_REQUEST, 0), 0);
	CHECK_EQ(gs_send_ctrl(&V, &g2, VIRTIO_VSOCK_OP_CREDIT_REQUEST, 0), 0);
	for (int i = 0; i < 200 && (g1.peer_fwd_cnt != (uint32_t)total ||
				    g2.peer_fwd_cnt != (uint32_t)total); i++)
		gs_pump(&V, NULL, 0, 10, NULL);
	CHECK_EQ(g1.peer_fwd_cnt, (uint32_t)total);
	CHECK_EQ(g2.peer_fwd_cnt, (uint32_t)total);
	teardown();
}

/* 4 MiB host -> guest into a guest with only 64 KiB buf_alloc: the host
 * writer runs out of credit over and over and resumes on writable. */
static void t_data_host_to_guest(void)
{
	const uint64_t total = 4u << 20;
	struct gstream g;
	struct hconn *hc;

	CHECK(setup(0, NULL) == 0);
	gs_init(&g, 40020, 1030, 65536);
	g.rx_seed = 99;
	CHECK_EQ(gs_connect(&V, &g), 0);
	CHECK(WAIT_FOR(&V, H.naccepted == 1, 1000));
	hc = H.accepted[0];
	big_lock();
	hc->tx_seed = 99;
	hc->tx_total = total;
	hc->tx_shut_after = true;
	hconn_pump_tx(hc);
	big_unlock();
	for (int i = 0; i < 1000 && !(g.rx_bytes == total && g.peer_shut_send); i++)
		gs_pump(&V, NULL, 0, 10, NULL);
	CHECK_EQ(g.rx_bytes, total);
	CHECK(!g.rx_bad);
	CHECK(g.peer_shut_send); /* SHUT_WR arrives after all the data */
	CHECK(!g.peer_shut_rcv);
	CHECK(hc->writable_calls > 0);
	/* host half-closed: the guest can still send */
	H.accepted[0]->auto_read = true;
	H.accepted[0]->rx_seed = 3;
	CHECK_EQ(gs_send_data(&V, &g, 3, 300000, false), 0);
	CHECK(WAIT_FOR(&V, hc->rx_bytes == 300000, 2000));
	CHECK(!hc->rx_bad);
	teardown();
}

struct pipe_feeder {
	int fd;
	uint32_t seed;
	uint64_t total;
};

static void *feeder(void *arg)
{
	struct pipe_feeder *f = arg;
	uint8_t buf[65536];
	uint64_t off = 0;

	while (off < f->total) {
		size_t n = (size_t)MIN(sizeof(buf), f->total - off);
		gen_fill(f->seed, off, buf, n);
		if (write_all(f->fd, buf, n) < 0)
			break;
		off += n;
	}
	close(f->fd);
	return NULL;
}

/* Zero-copy path: readv from a pipe straight into guest rx buffers. */
static void t_splice_from_fd(void)
{
	const uint64_t total = 3u << 20;
	struct pipe_feeder f;
	struct gstream g;
	struct hconn *hc;
	pthread_t th;
	int p[2];
	bool eof = false;
	uint64_t moved = 0;

	CHECK(setup(0, NULL) == 0);
	gs_init(&g, 40030, 1031, 128 * 1024);
	g.rx_seed = 11;
	CHECK_EQ(gs_connect(&V, &g), 0);
	CHECK(WAIT_FOR(&V, H.naccepted == 1, 1000));
	hc = H.accepted[0];
	CHECK(pipe2(p, O_NONBLOCK) == 0);
	f.fd = p[1];
	f.seed = 11;
	f.total = total;
	fcntl(p[1], F_SETFL, 0);
	pthread_create(&th, NULL, feeder, &f);
	for (int i = 0; i < 20000 && !eof; i++) {
		ssize_t n;
		big_lock();
		n = vsock_conn_splice_from_fd(hc->c, p[0]);
		big_unlock();
		if (n > 0)
			moved += (uint64_t)n;
		else if (n == 0)
			eof = true;
		else if (n != -EAGAIN) {
			fprintf(stderr, "splice_from_fd: %s\n", strerror((int)-n));
			break;
		}
		gs_pump(&V, NULL, 0, n > 0 ? 0 : 1, NULL);
	}
	pthread_join(th, NULL);
	close(p[0]);
	CHECK(eof);
	CHECK_EQ(moved, total);
	for (int i = 0; i < 200 && g.rx_bytes < total; i++)
		gs_pump(&V, NULL, 0, 10, NULL);
	CHECK_EQ(g.rx_bytes, total);
	CHECK(!g.rx_bad);
	teardown();
}

struct pipe_drain {
	int fd;
	uint32_t seed;
	uint64_t got;
	bool bad;
};

static void *drainer(void *arg)
{
	struct pipe_drain *d = arg;
	uint8_t buf[65536];
	ssize_t n;

	while ((n = read(d->fd, buf, sizeof(buf))) > 0) {
		if (!gen_check(d->seed, d->got, buf, (size_t)n))
			d->bad = true;
		d->got += (uint64_t)n;
	}
	return NULL;
}

/* Guest data out to a socket with splice_to_fd (MSG_NOSIGNAL path). */
static void t_splice_to_fd(void)
{
	const uint64_t total = 2u << 20;
	struct pipe_drain dr = { 0 };
	struct gstream g;
	struct hconn *hc;
	pthread_t th;
	int sp[2];
	uint64_t moved = 0;

	CHECK(setup(0, NULL) == 0);
	gs_init(&g, 40040, 1032, 65536);
	CHECK_EQ(gs_connect(&V, &g), 0);
	CHECK(WAIT_FOR(&V, H.naccepted == 1, 1000));
	hc = H.accepted[0];
	CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sp) == 0);
	dr.fd = sp[1];
	dr.seed = 21;
	pthread_create(&th, NULL, drainer, &dr);
	/* the guest sends in the background of our pumping */
	uint64_t sent = 0;
	uint8_t buf[4096];
	for (int iter = 0; moved < total && iter < 200000; iter++) {
		ssize_t n;
		if (sent < total) {
			uint32_t credit = g.peer_buf_alloc - (g.tx_cnt - g.peer_fwd_cnt);
			uint32_t len = (uint32_t)MIN((uint64_t)MIN(credit, sizeof(buf)), total - sent);
			if (len) {
				struct virtio_vsock_hdr h;
				gen_fill(21, sent, buf, len);
				vd_hdr(&V, &h, g.gport, g.hport, VIRTIO_VSOCK_OP_RW, len, g.buf_alloc,
				       g.fwd_cnt);
				CHECK_EQ(vd_send(&V, &h, buf, len, VD_ONE), 0);
				g.tx_cnt += len;
				sent += len;
			}
		}
		big_lock();
		n = vsock_conn_splice_to_fd(hc->c, sp[0]);
		big_unlock();
		if (n > 0)
			moved += (uint64_t)n;
		else if (n != -EAGAIN) {
			fprintf(stderr, "splice_to_fd: %zd\n", n);
			break;
		}
		gs_pump(&V, NULL, 0, 0, NULL);
	}
	shutdown(sp[0], SHUT_WR);
	pthread_join(th, NULL);
	close(sp[0]);
	close(sp[1]);
	CHECK_EQ(moved, total);
	CHECK_EQ(dr.got, total);
	CHECK(!dr.bad);
	/* writing to a closed peer is EPIPE, not SIGPIPE */
	CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sp) == 0);
	close(sp[1]);
	gen_fill(21, 0, buf, 100);
	struct virtio_vsock_hdr h;
	vd_hdr(&V, &h, g.gport, g.hport, VIRTIO_VSOCK_OP_RW, 100, g.buf_alloc, g.fwd_cnt);
	CHECK_EQ(vd_send(&V, &h, buf, 100, VD_ONE), 0);
	CHECK(WAIT_FOR(&V, vsock_conn_readable(hc->c) == 100, 1000));
	big_lock();
	ssize_t n = vsock_conn_splice_to_fd(hc->c, sp[0]);
	big_unlock();
	CHECK_EQ(n, -EPIPE);
	close(sp[0]);
	teardown();
}

/* Close from either side, cleanly. */
static void t_close_both_ways(void)
{
	struct gstream g1, g2;
	struct vd_pkt p;

	CHECK(setup(0, NULL) == 0);
	gs_init(&g1, 40050, 1040, 65536);
	gs_init(&g2, 40051, 1040, 65536);
	CHECK_EQ(gs_connect(&V, &g1), 0);
	CHECK_EQ(gs_connect(&V, &g2), 0);
	CHECK(WAIT_FOR(&V, H.naccepted == 2, 1000));

	/* host closes g1 with data queued: data, then SHUTDOWN(both) */
	big_lock();
	CHECK_EQ(vsock_conn_write(H.accepted[0]->c, "bye", 3), 3);
	vsock_conn_close(H.accepted[0]->c);
	H.accepted[0]->c = NULL;
	big_unlock();
	for (int i = 0; i < 100 && g1.shut_flags != 3; i++)
		gs_pump(&V, NULL, 0, 10, NULL);
	CHECK_EQ(g1.rx_bytes, 3);
	CHECK_EQ(g1.shut_flags, VIRTIO_VSOCK_SHUTDOWN_RCV | VIRTIO_VSOCK_SHUTDOWN_SEND);
	/* the guest answers RST; no RST comes back */
	CHECK_EQ(gs_send_ctrl(&V, &g1, VIRTIO_VSOCK_OP_RST, 0), 0);
	CHECK(quiet(100));
	CHECK(!H.accepted[0]->closed); /* no callbacks after close */

	/* guest closes g2 after sending data: the device answers RST, the host
	 * reads the data, then EOF */
	g2.rx_seed = 0;
	CHECK_EQ(gs_send_data(&V, &g2, 8, 5000, false), 0);
	CHECK_EQ(gs_send_ctrl(&V, &g2, VIRTIO_VSOCK_OP_SHUTDOWN, 3), 0);
	CHECK_EQ(vd_recv(&V, &p, 1000), 0);
	CHECK_EQ(p.hdr.op, VIRTIO_VSOCK_OP_RST);
	CHECK_EQ(p.hdr.dst_port, 40051);
	free(p.data);
	{
		uint8_t buf[8192];
		ssize_t n;
		struct hconn *hc = H.accepted[1];
		CHECK(WAIT_FOR(&V, hc->readable_calls > 0, 1000));
		big_lock();
		n = vsock_conn_read(hc->c, buf, sizeof(buf));
		big_unlock();
		CHECK_EQ(n, 5000);
		CHECK(gen_check(8, 0, buf, 5000));
		big_lock();
		n = vsock_conn_read(hc->c, buf, sizeof(buf));
		ssize_t w = vsock_conn_write(hc->c, "x", 1);
		big_unlock();
		CHECK_EQ(n, 0);
		CHECK_EQ(w, -EPIPE);
		CHECK(!hc->closed); /* a clean close is EOF, not an error */
	}
	/* the pair is free again: the guest may reconnect with the same port */
	gs_init(&g2, 40051, 1040, 65536);
	CHECK_EQ(gs_connect(&V, &g2), 0);
	teardown();
}

/* The host closes and the guest never answers: RST after the timeout. */
static void t_close_timeout_rst(void)
{
	struct gstream g;
	struct vd_pkt p;

	CHECK(setup(0, NULL) == 0);
	gs_init(&g, 40060, 1050, 65536);
	CHECK_EQ(gs_connect(&V, &g), 0);
	CHECK(WAIT_FOR(&V, H.naccepted == 1, 1000));
	big_lock();
	vsock_conn_close(H.accepted[0]->c);
	H.accepted[0]->c = NULL;
	big_unlock();
	CHECK_EQ(vd_recv(&V, &p, 1000), 0);
	CHECK_EQ(p.hdr.op, VIRTIO_VSOCK_OP_SHUTDOWN);
	free(p.data);
	CHECK_EQ(vd_recv(&V, &p, 2000), 0);
	CHECK_EQ(p.hdr.op, VIRTIO_VSOCK_OP_RST);
	free(p.data);
	teardown();
}

static void t_rst_rules(void)
{
	struct virtio_vsock_hdr h;
	struct gstream g;
	struct vd_pkt p;

	CHECK(setup(0, NULL) == 0);
	/* RST for an unknown connection: silence */
	vd_hdr(&V, &h, 41000, 5000, VIRTIO_VSOCK_OP_RST, 0, 65536, 0);
	CHECK_EQ(vd_send(&V, &h, NULL, 0, VD_ONE), 0);
	CHECK(quiet(100));
	/* anything else for an unknown connection: RST */
	vd_hdr(&V, &h, 41001, 5000, VIRTIO_VSOCK_OP_RW, 4, 65536, 0);
	CHECK_EQ(vd_send(&V, &h, "abcd", 4, VD_ONE), 0);
	CHECK_EQ(vd_recv(&V, &p, 1000), 0);
	CHECK_EQ(p.hdr.op, VIRTIO_VSOCK_OP_RST);
	CHECK_EQ(p.hdr.src_port, 5000);
	CHECK_EQ(p.hdr.dst_port, 41001);
	free(p.data);
	vd_hdr(&V, &h, 41002, 5000, VIRTIO_VSOCK_OP_CREDIT_UPDATE, 0, 65536, 0);
	CHECK_EQ(vd_send(&V, &h, NULL, 0, VD_ONE), 0);
	CHECK_EQ(vd_recv(&V, &p, 1000), 0);
	CHECK_EQ(p.hdr.op, VIRTIO_VSOCK_OP_RST);
	free(p.data);
	/* unsupported type (SEQPACKET = 2): RST of that type; no accept */
	vd_hdr(&V, &h, 41003, 1024, VIRTIO_VSOCK_OP_REQUEST, 0, 65536, 0);
	h.type = 2;
	CHECK_EQ(vd_send(&V, &h, NULL, 0, VD_ONE), 0);
	CHECK_EQ(vd_recv(&V, &p, 1000), 0);
	CHECK_EQ(p.hdr.op, VIRTIO_VSOCK_OP_RST);
	CHECK_EQ(p.hdr.type, 2);
	free(p.data);
	CHECK_EQ(H.naccepted, 0);
	/* ... but not for an RST of that type */
	h.op = VIRTIO_VSOCK_OP_RST;
	CHECK_EQ(vd_send(&V, &h, NULL, 0, VD_ONE), 0);
	CHECK(quiet(100));
	/* spoofed source cid, wrong destination cid: dropped, no answer */
	vd_hdr(&V, &h, 41004, 1024, VIRTIO_VSOCK_OP_REQUEST, 0, 65536, 0);
	h.src_cid = V.cid + 1;
	CHECK_EQ(vd_send(&V, &h, NULL, 0, VD_ONE), 0);
	vd_hdr(&V, &h, 41005, 1024, VIRTIO_VSOCK_OP_REQUEST, 0, 65536, 0);
	h.dst_cid = 7;
	CHECK_EQ(vd_send(&V, &h, NULL, 0, VD_ONE), 0);
	CHECK(quiet(100));
	CHECK_EQ(H.naccepted, 0);
	/* header len larger than the chain: dropped */
	vd_hdr(&V, &h, 41006, 1024, VIRTIO_VSOCK_OP_REQUEST, 0, 65536, 0);
	h.len = 1000;
	CHECK_EQ(vd_send(&V, &h, "xx", 2, VD_ONE), 0);
	CHECK(quiet(100));
	CHECK_EQ(H.naccepted, 0);
	/* guest RST on an established connection: closed(ECONNRESET) */
	gs_init(&g, 41007, 1024, 65536);
	CHECK_EQ(gs_connect(&V, &g), 0);
	CHECK(WAIT_FOR(&V, H.naccepted == 1, 1000));
	CHECK_EQ(gs_send_ctrl(&V, &g, VIRTIO_VSOCK_OP_RST, 0), 0);
	CHECK(WAIT_FOR(&V, H.accepted[0]->closed, 1000));
	CHECK_EQ(H.accepted[0]->err, ECONNRESET);
	CHECK(quiet(100));
	{
		char b[4];
		big_lock();
		CHECK_EQ(vsock_conn_read(H.accepted[0]->c, b, 4), -ECONNRESET);
		CHECK_EQ(vsock_conn_write(H.accepted[0]->c, b, 4), -ECONNRESET);
		big_unlock();
	}
	teardown();
}

static void t_credit_request(void)
{
	struct gstream g;
	struct vd_pkt p;

	CHECK(setup(0, NULL) == 0);
	gs_init(&g, 42000, 1024, 65536);
	CHECK_EQ(gs_connect(&V, &g), 0);
	CHECK_EQ(gs_send_ctrl(&V, &g, VIRTIO_VSOCK_OP_CREDIT_REQUEST, 0), 0);
	CHECK_EQ(vd_recv(&V, &p, 1000), 0);
	CHECK_EQ(p.hdr.op, VIRTIO_VSOCK_OP_CREDIT_UPDATE);
	CHECK_EQ(p.hdr.buf_alloc, 256 * 1024);
	free(p.data);
	teardown();
}

/* Credit abuse: a guest that sends beyond buf_alloc is reset, not buffered. */
static void t_credit_overrun(void)
{
	struct gstream g;
	static uint8_t buf[65536];
	struct virtio_vsock_hdr h;
	struct vd_pkt p;
	int rst = 0;

	CHECK(setup(0, NULL) == 0); /* host does not read */
	gs_init(&g, 42100, 1024, 65536);
	CHECK_EQ(gs_connect(&V, &g), 0);
	CHECK(WAIT_FOR(&V, H.naccepted == 1, 1000));
	for (int i = 0; i < 5; i++) {
		vd_hdr(&V, &h, g.gport, g.hport, VIRTIO_VSOCK_OP_RW, 65536, 65536, 0);
		CHECK_EQ(vd_send(&V, &h, buf, 65536, VD_HDR_PAYLOAD), 0);
	}
	while (vd_recv(&V, &p, 300) == 0) {
		rst += p.hdr.op == VIRTIO_VSOCK_OP_RST;
		free(p.data);
	}
	CHECK_EQ(rst, 1);
	CHECK(WAIT_FOR(&V, H.accepted[0]->closed, 1000));
	teardown();
}

static void t_conn_limit(void)
{
	struct gstream g[5];
	struct vsock_conn *c;

	CHECK(setup(4, NULL) == 0);
	for (int i = 0; i < 4; i++) {
		gs_init(&g[i], 43000 + i, 1024, 65536);
		CHECK_EQ(gs_connect(&V, &g[i]), 0);
	}
	gs_init(&g[4], 43004, 1024, 65536);
	CHECK_EQ(gs_connect(&V, &g[4]), -ECONNREFUSED);
	big_lock();
	errno = 0;
	c = vsock_connect(H.dev, 3000, &hconn_ops, NULL);
	big_unlock();
	CHECK(c == NULL);
	CHECK_EQ(errno, EMFILE);
	/* one closes: room for one more */
	CHECK_EQ(gs_send_ctrl(&V, &g[0], VIRTIO_VSOCK_OP_RST, 0), 0);
	CHECK(WAIT_FOR(&V, H.accepted[0]->closed, 1000));
	gs_init(&g[4], 43005, 1024, 65536);
	CHECK_EQ(gs_connect(&V, &g[4]), 0);
	teardown();
}

/* Many connections at once, both directions, interleaved. */
static void t_many_conns(void)
{
	enum { N = 24 };
	static struct gstream g[N];
	struct gstream *gp[N];
	const uint64_t each = 200000;

	CHECK(setup(0, NULL) == 0);
	H.accept_auto_read = true;
	H.accept_seed = 1;
	for (int i = 0; i < N; i++) {
		gs_init(&g[i], 44000 + i, 1100, 65536);
		g[i].rx_seed = 2;
		gp[i] = &g[i];
		CHECK_EQ(gs_connect(&V, &g[i]), 0);
	}
	CHECK(WAIT_FOR(&V, H.naccepted == N, 1000));
	big_lock();
	for (int i = 0; i < N; i++) {
		H.accepted[i]->tx_seed = 2;
		H.accepted[i]->tx_total = each;
		hconn_pump_tx(H.accepted[i]);
	}
	big_unlock();
	for (int i = 0; i < N; i++)
		CHECK_EQ(gs_send_data(&V, &g[i], 1, each, true), 0);
	bool done = false;
	for (int k = 0; k < 500 && !done; k++) {
		gs_pump(&V, gp, N, 10, NULL);
		done = true;
		for (int i = 0; i < N; i++)
			done &= g[i].rx_bytes == each;
	}
	for (int i = 0; i < N; i++) {
		CHECK_EQ(g[i].rx_bytes, each);
		CHECK(!g[i].rx_bad);
	}
	CHECK(WAIT_FOR(&V, ({
		bool all = true;
		for (int i = 0; i < N; i++)
			all &= H.accepted[i]->rx_bytes == each && !H.accepted[i]->rx_bad;
		all;
	}), 3000));
	teardown();
}

int main(void)
{
	int fails = 0;

	signal(SIGPIPE, SIG_DFL); /* a stray SIGPIPE must kill the test */
	log_verbosity = getenv("VSOCK_DEBUG") ? LOG_DEBUG : LOG_WARN;
	fails += run_test("handshake_and_config_cid", t_handshake_cid);
	fails += run_test("guest_connect_accepted", t_guest_connect_accepted);
	fails += run_test("guest_connect_refused", t_guest_connect_refused);
	fails += run_test("host_connect_established", t_host_connect_established);
	fails += run_test("host_connect_refused", t_host_connect_refused);
	fails += run_test("host_connect_without_frontend", t_host_connect_without_frontend);
	fails += run_test("data_guest_to_host_4MiB_proactive_credit", t_data_guest_to_host);
	fails += run_test("data_guest_to_host_direct_delivery", t_data_guest_to_host_direct);
	fails += run_test("data_host_to_guest_4MiB_credit_exhaustion", t_data_host_to_guest);
	fails += run_test("splice_from_fd_zero_copy", t_splice_from_fd);
	fails += run_test("splice_to_fd", t_splice_to_fd);
	fails += run_test("close_both_ways", t_close_both_ways);
	fails += run_test("close_timeout_rst", t_close_timeout_rst);
	fails += run_test("rst_rules", t_rst_rules);
	fails += run_test("credit_request", t_credit_request);
	fails += run_test("credit_overrun_resets", t_credit_overrun);
	fails += run_test("conn_limit", t_conn_limit);
	fails += run_test("many_conns", t_many_conns);
	fprintf(stderr, "%d failed\n", fails);
	return fails ? 1 : 0;
}
