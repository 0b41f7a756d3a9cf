/* Manual check tool: serves the vsock device on a vhost-user socket for a
 * real QEMU and gives the guest something to talk to.  Not run by make check.
 *
 *   vsock_echo_host SOCKET CID
 *
 * Guest -> host ports:  1024 echo (half-close passed through),
 *                       1025 sink (saved to /tmp/vsock-sink-N.bin),
 *                       1026 source (sends $VSOCK_SRC, then closes).
 * stdin commands:       connect PORT INFILE OUTFILE  (host -> guest: send
 *                       INFILE, SHUT_WR, save what comes back to OUTFILE)
 *                       quit
 * Events are printed one per line on stdout. */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "log.h"
#include "loop.h"
#include "util.h"
#include "vsock/vsock.h"

enum mode { ECHO, SINK, SOURCE, DIAL };

struct ep {
	struct vsock_conn *c;
	enum mode mode;
	int id;
	int in_fd, out_fd;
	uint8_t buf[65536];
	size_t len, off;
	bool rx_eof, tx_done;
	uint64_t rx, tx;
};

static int next_id;

static void ep_finish(struct ep *e, const char *why)
{
	printf("conn %d %s rx=%llu tx=%llu\n", e->id, why, (unsigned long long)e->rx,
	       (unsigned long long)e->tx);
	fflush(stdout);
	if (e->c)
		vsock_conn_close(e->c);
	if (e->in_fd >= 0)
		close(e->in_fd);
	if (e->out_fd >= 0)
		close(e->out_fd);
	free(e);
}

static void ep_maybe_done(struct ep *e)
{
	if (e->rx_eof && e->tx_done)
		ep_finish(e, "done");
}

static void ep_pump_tx(struct ep *e)
{
	if (e->tx_done)
		return;
	if (e->mode == ECHO) {
		while (e->off < e->len) {
			ssize_t n = vsock_conn_write(e->c, e->buf + e->off, e->len - e->off);
			if (n < 0)
				return;
			e->off += (size_t)n;
			e->tx += (uint64_t)n;
		}
		e->len = e->off = 0;
		if (e->rx_eof) {
			vsock_conn_shutdown(e->c, SHUT_WR);
			e->tx_done = true;
		}
		return;
	}
	if (e->in_fd < 0)
		return;
	for (;;) {
		/* zero-copy: the file is read straight into guest rx buffers */
		ssize_t n = vsock_conn_splice_from_fd(e->c, e->in_fd);
		if (n > 0) {
			e->tx += (uint64_t)n;
			continue;
		}
		if (n == 0) {
			vsock_conn_shutdown(e->c, SHUT_WR);
			e->tx_done = true;
		}
		return;
	}
}

static void ep_readable(struct vsock_conn *c, void *arg)
{
	struct ep *e = arg;
	ssize_t n;

	if (e->mode == ECHO) {
		while (e->len == 0 && !e->rx_eof) {
			n = vsock_conn_read(c, e->buf, sizeof(e->buf));
			if (n == -EAGAIN)
				break;
			if (n <= 0) {
				e->rx_eof = true;
				break;
			}
			e->len = (size_t)n;
			e->rx += (uint64_t)n;
			ep_pump_tx(e);
		}
		if (e->rx_eof)
			ep_pump_tx(e);
	} else {
		for (;;) {
			n = e->out_fd >= 0 ? vsock_conn_splice_to_fd(c, e->out_fd)
					   : vsock_conn_read(c, e->buf, sizeof(e->buf));
			if (n > 0) {
				e->rx += (uint64_t)n;
				continue;
			}
			if (n == 0)
				e->rx_eof = true;
			break;
		}
	}
	ep_maybe_done(e);
}

static void ep_writable(struct vsock_conn *c, void *arg)
{
	struct ep *e = arg;

	ep_pump_tx(e);
	if (e->mode == ECHO && e->len == 0)
		ep_readable(c, arg); /* resume reading what waited for room */
	else
		ep_maybe_done(e);
}

static void ep_established(struct vsock_conn *c, void *arg)
{
	struct ep *e = arg;

	printf("conn %d established local=%u peer=%u\n", e->id, vsock_conn_local_port(c),
	       vsock_conn_peer_port(c));
	fflush(stdout);
	ep_pump_tx(e);
	ep_maybe_done(e);
}

static void ep_closed(struct vsock_conn *c, void *arg, int err)
{
	struct ep *e = arg;
	char why[64];

	snprintf(why, sizeof(why), "closed %s", strerror(err));
	ep_finish(e, why);
}

static const struct vsock_conn_ops ep_ops = {
	.established = ep_established,
	.readable = ep_readable,
	.writable = ep_writable,
	.closed = ep_closed,
};

static struct ep *ep_new(struct vsock_conn *c, enum mode m)
{
	struct ep *e = calloc(1, sizeof(*e));

	e->c = c;
	e->mode = m;
	e->id = next_id++;
	e->in_fd = e->out_fd = -1;
	if (m == ECHO || m == SINK)
		e->tx_done = m == SINK;
	if (m == SOURCE)
		e->rx_eof = false;
	return e;
}

static int on_accept(void *arg, struct vsock_conn *c, uint32_t host_port, uint32_t guest_port)
{
	struct ep *e;
	char path[64];

	if (host_port < 1024 || host_port > 1026) {
		printf("refuse guest port %u -> host port %u\n", guest_port, host_port);
		fflush(stdout);
		return -ECONNREFUSED;
	}
	e = ep_new(c, host_port == 1024 ? ECHO : host_port == 1025 ? SINK : SOURCE);
	if (e->mode == SINK) {
		snprintf(path, sizeof(path), "/tmp/vsock-sink-%d.bin", e->id);
		e->out_fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	}
	if (e->mode == SOURCE) {
		const char *src = getenv("VSOCK_SRC");
		e->in_fd = src ? open(src, O_RDONLY | O_CLOEXEC) : -1;
		if (e->in_fd < 0)
			e->tx_done = true;
	}
	printf("conn %d accepted guest port %u -> host port %u\n", e->id, guest_port, host_port);
	fflush(stdout);
	vsock_conn_set_ops(c, &ep_ops, e);
	ep_pump_tx(e);
	return 0;
}

int main(int argc, char **argv)
{
	struct vsock_dev_config cfg = { 0 };
	struct vsock_dev *d;
	struct loop *l;
	char line[512];

	if (argc != 3) {
		fprintf(stderr, "usage: %s SOCKET CID\n", argv[0]);
		return 2;
	}
	log_verbosity = getenv("VSOCK_DEBUG") ? LOG_DEBUG : LOG_INFO;
	signal(SIGPIPE, SIG_IGN);
	setvbuf(stdout, NULL, _IOLBF, 0);
	l = loop_new();
	cfg.guest_cid = strtoull(argv[2], NULL, 0);
	cfg.socket_path = argv[1];
	cfg.accept = on_accept;
	big_lock();
	d = vsock_dev_new(l, &cfg);
	big_unlock();
	if (!d) {
		fprintf(stderr, "vsock_dev_new: %s\n", strerror(errno));
		return 1;
	}
	loop_start(l);
	printf("listening on %s cid %s\n", argv[1], argv[2]);
	while (fgets(line, sizeof(line), stdin)) {
		unsigned port;
		char in[200], out[200];

		if (!strncmp(line, "quit", 4))
			break;
		if (sscanf(line, "connect %u %199s %199s", &port, in, out) == 3) {
			struct ep *e = ep_new(NULL, DIAL);
			e->in_fd = open(in, O_RDONLY | O_CLOEXEC);
			e->out_fd = open(out, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
			big_lock();
			e->c = vsock_connect(d, port, &ep_ops, e);
			if (!e->c) {
				printf("connect %u: %s\n", port, strerror(errno));
				free(e);
			} else {
				printf("conn %d connecting to guest port %u\n", e->id, port);
			}
			big_unlock();
		} else if (!strncmp(line, "ready", 5)) {
			big_lock();
			printf("ready %d\n", vsock_dev_ready(d));
			big_unlock();
		}
	}
	big_lock();
	vsock_dev_free(d);
	big_unlock();
	loop_stop(l);
	loop_free(l);
	return 0;
}
