/* Exported Unix sockets: one per declared port (SOCKDIR/<vm>/<port>.sock or
 * the declared path), the Firecracker-style hybrid socket vsock.sock, and
 * forwarding of guest connections to vsock.sock_<port> listeners.  Each
 * client becomes a bridge between its socket and one vsock connection. */
#include "config.h"

#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include "capsafs.h"
#include "log.h"
#include "loop.h"
#include "util.h"
#include "vm.h"
#include "vsock/vsock.h"
#include "vsock_host.h"

#define HYBRID_LINE_MAX 64  /* "CONNECT 4294967295\n" fits with room */

enum bridge_state {
	BR_WAITING,    /* listen-port client: waits for a guest connection */
	BR_COMMAND,    /* hybrid client: reading "CONNECT <port>\n" */
	BR_CONNECTING, /* dialled the guest, waiting for its answer */
	BR_OPEN,
};

struct vbridge {
	struct vmvsock *vs;
	uint32_t port;
	bool counted;
	bool hybrid; /* answers "OK <port>" once the guest accepted */
	enum bridge_state st;
	int fd;
	struct loop_watch *w;
	struct vsock_conn *conn;
	char in[HYBRID_LINE_MAX]; /* command bytes, then what followed them */
	size_t inlen;
	char *out; /* bytes for the client not yet taken by its socket */
	size_t outlen, outoff;
	bool client_eof; /* client shut its side: guest got SHUTDOWN(SEND) */
	bool guest_eof;  /* guest shut its side: client got SHUT_WR */
	struct vbridge *next;  /* vs->bridges */
	struct vbridge *wnext; /* port->clients while BR_WAITING */
};

static void bridge_pump(struct vbridge *b);

/* ---- listening sockets ---- */

/* sun_path holds 108 bytes; a longer path is reached through an O_PATH fd
 * of its directory.  Fills sa; returns the directory fd to close (or -1). */
static int unix_addr(const char *path, struct sockaddr_un *sa)
{
	char dir[PATH_MAX];
	const char *base = strrchr(path, '/');
	int dfd;

	sa->sun_family = AF_UNIX;
	if (strlen(path) < sizeof(sa->sun_path)) {
		strcpy(sa->sun_path, path);
		return -1;
	}
	if (!base || (size_t)(base - path) >= sizeof(dir))
		return -ENAMETOOLONG;
	memcpy(dir, path, (size_t)(base - path));
	dir[base - path] = '\0';
	dfd = open(dir[0] ? dir : "/", O_PATH | O_DIRECTORY | O_CLOEXEC);
	if (dfd < 0)
		return -errno;
	if ((size_t)snprintf(sa->sun_path, sizeof(sa->sun_path), "/proc/self/fd/%d%s", dfd, base) >=
	    sizeof(sa->sun_path)) {
		close(dfd);
		return -ENAMETOOLONG;
	}
	return dfd;
}

int unix_listen_at(struct vm *vm, const char *path)
{
	struct sockaddr_un sa;
	struct stat st;
	__do_close int fd = -1;
	__do_close int dfd = -1;

	dfd = unix_addr(path, &sa);
	if (dfd < -1)
		return vm_fail(vm, -dfd, "cannot reach %s: %s", path, strerror(-dfd));
	/* a stale socket from a crashed daemon is replaced; anything else stays */
	if (lstat(path, &st) == 0) {
		if (!S_ISSOCK(st.st_mode))
			return vm_fail(vm, EEXIST, "%s exists and is not a socket", path);
		unlink(path);
	}
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return vm_fail(vm, errno, "socket: %s", strerror(errno));
	if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
		return vm_fail(vm, errno, "cannot bind %s: %s", path, strerror(errno));
	if (chmod(path, 0600) < 0 ||
	    (geteuid() == 0 && chown(path, vm->uid, vm->gid) < 0) || listen(fd, SOMAXCONN) < 0) {
		int e = errno;
		unlink(path);
		return vm_fail(vm, e, "cannot set up %s: %s", path, strerror(e));
	}
	return move_fd(fd);
}

int unix_connect_at(const char *path)
{
	struct sockaddr_un sa;
	__do_close int dfd = unix_addr(path, &sa);
	__do_close int fd = -1;

	if (dfd < -1)
		return dfd;
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
		return -errno;
	return move_fd(fd);
}

static struct vbridge *bridge_new(struct vmvsock *vs, int fd, uint32_t port,
				  enum bridge_state st)
{
	struct vbridge *b = calloc(1, sizeof(*b));

	if (!b)
		return NULL;
	b->vs = vs;
	b->fd = fd;
	b->port = port;
	b->st = st;
	b->next = vs->bridges;
	vs->bridges = b;
	return b;
}

static void bridge_count(struct vbridge *b, int delta)
{
	struct vport *p = vport_find(b->vs, b->port);

	if (b->st == BR_COMMAND)
		return;
	if (delta > 0 && !b->counted && p) {
		p->conns++;
		b->counted = true;
	} else if (delta < 0 && b->counted) {
		if (p && p->conns)
			p->conns--;
		b->counted = false;
	}
}

static void bridge_unwait(struct vbridge *b)
{
	struct vport *p = vport_find(b->vs, b->port);
	struct vbridge **pp;

	if (b->st != BR_WAITING || !p)
		return;
	for (pp = &p->clients; *pp; pp = &(*pp)->wnext) {
		if (*pp == b) {
			*pp = b->wnext;
			break;
		}
	}
}

static void bridge_free(struct vbridge *b)
{
	struct vbridge **pp;

	bridge_unwait(b);
	bridge_count(b, -1);
	for (pp = &b->vs->bridges; *pp; pp = &(*pp)->next) {
		if (*pp == b) {
			*pp = b->next;
			break;
		}
	}
	loop_watch_del(b->w);
	if (b->conn)
		vsock_conn_close(b->conn); /* what was queued still reaches the guest */
	close(b->fd);
	free(b->out);
	free(b);
}

static void bridge_watch(struct vbridge *b, uint32_t events)
{
	if (b->w)
		loop_watch_mod(b->w, events);
}

/* ---- the connection's side ---- */

static void bridge_established(struct vsock_conn *c, void *arg)
{
	struct vbridge *b = arg;
	char ok[32];
	int n;

	if (b->st != BR_CONNECTING)
		return;
	b->st = BR_OPEN;
	bridge_count(b, +1);
	if (b->hybrid) { /* Firecracker's answer: the host-side port */
		n = snprintf(ok, sizeof(ok), "OK %" PRIu32 "\n", vsock_conn_local_port(c));
		b->out = malloc((size_t)n);
		if (!b->out) {
			bridge_free(b);
			return;
		}
		memcpy(b->out, ok, (size_t)n);
		b->outlen = (size_t)n;
		b->outoff = 0;
	}
	bridge_pump(b);
}

static void bridge_readable(struct vsock_conn *c, void *arg)
{
	bridge_pump(arg);
}

static void bridge_writable(struct vsock_conn *c, void *arg)
{
	bridge_pump(arg);
}

static void bridge_closed(struct vsock_conn *c, void *arg, int err)
{
	struct vbridge *b = arg;

	/* reset or refused: the client sees its socket close */
	vsock_conn_close(c);
	b->conn = NULL;
	bridge_free(b);
}

/* Guest → client as the packet arrives: from guest memory straight into the
 * socket.  Whatever the socket does not take now (full, or an error the pump
 * will see) is buffered by the device and sent by bridge_to_client. */
static size_t bridge_deliver(struct vsock_conn *c, void *arg, const struct iovec *iov, int cnt,
			     size_t len)
{
	struct vbridge *b = arg;
	struct msghdr mh = { .msg_iov = (struct iovec *)iov, .msg_iovlen = (size_t)cnt };
	ssize_t n;

	if (b->st != BR_OPEN || b->guest_eof || b->outoff < b->outlen)
		return 0;
	do
		n = sendmsg(b->fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
	while (n < 0 && errno == EINTR);
	return n > 0 ? (size_t)n : 0;
}

static const struct vsock_conn_ops bridge_ops = {
	.established = bridge_established,
	.readable = bridge_readable,
	.writable = bridge_writable,
	.closed = bridge_closed,
	.deliver = bridge_deliver,
};

/* ---- moving bytes ---- */

/* Guest → client, straight from the connection's buffers into the socket.
 * Returns false if the bridge was freed. */
static bool bridge_to_client(struct vbridge *b)
{
	for (;;) {
		ssize_t n;

		if (b->outoff < b->outlen) { /* the hybrid "OK <port>" line first */
			n = send(b->fd, b->out + b->outoff, b->outlen - b->outoff,
				 MSG_NOSIGNAL | MSG_DONTWAIT);
			if (n < 0) {
				if (errno == EAGAIN || errno == EINTR)
					return true;
				bridge_free(b); /* the client went away */
				return false;
			}
			b->outoff += (size_t)n;
			if (b->outoff < b->outlen)
				return true;
			free(b->out);
			b->out = NULL;
			b->outlen = b->outoff = 0;
		}
		if (!b->conn || b->guest_eof)
			return true;
		n = vsock_conn_splice_to_fd(b->conn, b->fd);
		if (n == -EAGAIN)
			return true; /* nothing buffered, or the socket is full */
		if (n == 0) {
			b->guest_eof = true;
			shutdown(b->fd, SHUT_WR); /* the guest's half-close, passed on */
			return true;
		}
		if (n < 0) {
			bridge_free(b);
			return false;
		}
	}
}

/* Client → guest.  Returns false if the bridge was freed. */
static bool bridge_to_guest(struct vbridge *b)
{
	while (b->conn && !b->client_eof && vsock_conn_writable(b->conn) > 0) {
		ssize_t n;

		if (b->inlen) { /* bytes that came with the CONNECT line */
			n = vsock_conn_write(b->conn, b->in, b->inlen);
			if (n < 0 && n != -EAGAIN) {
				bridge_free(b);
				return false;
			}
			if (n <= 0)
				return true;
			memmove(b->in, b->in + n, b->inlen - (size_t)n);
			b->inlen -= (size_t)n;
			continue;
		}
		n = vsock_conn_splice_from_fd(b->conn, b->fd);
		if (n == -EAGAIN)
			return true;
		if (n == 0) {
			b->client_eof = true;
			vsock_conn_shutdown(b->conn, SHUT_WR);
			return true;
		}
		if (n < 0) {
			bridge_free(b);
			return false;
		}
	}
	return true;
}

static void bridge_pump(struct vbridge *b)
{
	uint32_t ev = 0;

	if (b->st != BR_OPEN)
		return;
	if (!bridge_to_client(b) || !bridge_to_guest(b))
		return;
	if (b->client_eof && b->guest_eof && b->outoff >= b->outlen) {
		bridge_free(b);
		return;
	}
	if (!b->client_eof && b->conn && vsock_conn_writable(b->conn) > 0 && !b->inlen)
		ev |= EPOLLIN;
	if (b->outoff < b->outlen ||
	    (b->conn && !b->guest_eof && vsock_conn_readable(b->conn) > 0))
		ev |= EPOLLOUT; /* the socket was full */
	bridge_watch(b, ev);
}

int hybrid_parse_line(char *in, size_t cap, size_t *inlen, uint32_t *port)
{
	char *nl = memchr(in, '\n', *inlen), *end;
	size_t linelen;
	uint64_t v;

	if (!nl)
		return *inlen >= cap ? -EINVAL : -EAGAIN;
	linelen = (size_t)(nl - in);
	if (linelen > 0 && in[linelen - 1] == '\r')
		end = nl - 1;
	else
		end = nl;
	if ((size_t)(end - in) < 8 || memcmp(in, "CONNECT ", 8) != 0)
		return -EINVAL;
	if (parse_u64(in + 8, (size_t)(end - in) - 8, 0, 0xfffffffeu, &v) < 0)
		return -EINVAL;
	*port = (uint32_t)v;
	/* what follows the newline belongs to the stream */
	*inlen -= linelen + 1;
	memmove(in, nl + 1, *inlen);
	return 0;
}

static int hybrid_parse(struct vbridge *b, uint32_t *port)
{
	return hybrid_parse_line(b->in, sizeof(b->in), &b->inlen, port);
}

static void bridge_dial(struct vbridge *b, uint32_t port)
{
	struct vsock_dev *dev = b->vs->dev;

	b->st = BR_CONNECTING;
	bridge_watch(b, 0);
	b->conn = dev ? vsock_connect(dev, port, &bridge_ops, b) : NULL;
	if (!b->conn)
		bridge_free(b);
}

static void bridge_event(void *arg, uint32_t events)
{
	struct vbridge *b = arg;

	if (events & EPOLLERR) {
		bridge_free(b);
		return;
	}
	switch (b->st) {
	case BR_WAITING:
	case BR_CONNECTING:
		if (events & (EPOLLHUP | EPOLLRDHUP)) /* gave up before it started */
			bridge_free(b);
		return;
	case BR_COMMAND: {
		uint32_t port;
		ssize_t n = recv(b->fd, b->in + b->inlen, sizeof(b->in) - b->inlen, MSG_DONTWAIT);
		int r;
		if (n < 0 && (errno == EAGAIN || errno == EINTR))
			return;
		if (n <= 0) {
			bridge_free(b);
			return;
		}
		b->inlen += (size_t)n;
		r = hybrid_parse(b, &port);
		if (r == -EAGAIN)
			return;
		if (r < 0) {
			log_info("%s: vsock.sock: bad command, closing", b->vs->vm->name);
			bridge_free(b);
			return;
		}
		b->port = port;
		bridge_dial(b, port);
		return;
	}
	case BR_OPEN:
		if ((events & EPOLLHUP) && !(events & EPOLLIN) && b->outoff >= b->outlen) {
			bridge_free(b);
			return;
		}
		bridge_pump(b);
		return;
	}
}

static struct vbridge *bridge_accept(struct vmvsock *vs, int lfd, uint32_t port,
				     enum bridge_state st)
{
	int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
	struct vbridge *b;

	if (fd < 0)
		return NULL;
	b = bridge_new(vs, fd, port, st);
	if (!b) {
		close(fd);
		return NULL;
	}
	b->hybrid = st == BR_COMMAND;
	b->w = loop_watch_add(cfs.loop, fd, st == BR_COMMAND ? EPOLLIN : 0, bridge_event, b);
	if (!b->w) {
		bridge_free(b);
		return NULL;
	}
	return b;
}

static void port_accept_ready(void *arg, uint32_t events)
{
	struct vport *p = arg;
	struct vmvsock *vs = p->vm->vsock;
	struct vbridge *b, **pp;
	struct vsock_conn *c;

	for (;;) {
		b = bridge_accept(vs, p->listen_fd, p->port,
				  p->mode == VPORT_LISTEN ? BR_WAITING : BR_CONNECTING);
		if (!b)
			return;
		if (p->mode == VPORT_CONNECT) {
			bridge_dial(b, p->port); /* each client dials the guest anew */
			continue;
		}
		c = vport_backlog_pop(p);
		if (c) {
			b->conn = c;
			vsock_conn_set_ops(c, &bridge_ops, b);
			b->st = BR_OPEN;
			bridge_count(b, +1);
			bridge_pump(b);
			continue;
		}
		for (pp = &p->clients; *pp; pp = &(*pp)->wnext)
			;
		*pp = b; /* first come, first paired */
	}
}

int vexport_port_open(struct vport *p)
{
	struct vm *vm = p->vm;

	struct cred_saved saved;
	int r;

	vport_sockpath(vm, p, p->sockpath, sizeof(p->sockpath));
	if (p->path) { /* the declarer's path: their permissions, not ours */
		r = cred_enter(&p->cred, &saved);
		if (r < 0)
			return vm_fail(vm, -r, "vsock: cannot act as the user who declared %s",
				       p->sockpath);
	}
	p->listen_fd = unix_listen_at(vm, p->sockpath);
	if (p->path)
		cred_leave(&saved);
	if (p->listen_fd < 0)
		return p->listen_fd;
	p->listen_w = loop_watch_add(cfs.loop, p->listen_fd, EPOLLIN, port_accept_ready, p);
	if (!p->listen_w) {
		vexport_port_close(p);
		return vm_fail(vm, ENOMEM, "cannot watch %s", p->sockpath);
	}
	return 0;
}

void vexport_port_close(struct vport *p)
{
	while (p->clients) {
		struct vbridge *b = p->clients;
		p->clients = b->wnext;
		b->st = BR_CONNECTING; /* no longer waiting: skip the unlink */
		bridge_free(b);
	}
	if (p->listen_w) {
		loop_watch_del(p->listen_w);
		p->listen_w = NULL;
	}
	if (p->listen_fd >= 0) {
		struct cred_saved saved;
		bool as_user = p->path && cred_enter(&p->cred, &saved) == 0;

		close(p->listen_fd);
		p->listen_fd = -1;
		/* as the declarer: a directory of theirs swapped for a symlink must
		 * not make us remove someone else's file */
		if (!p->path || as_user)
			unlink(p->sockpath);
		if (as_user)
			cred_leave(&saved);
	}
}

bool vexport_take_guest_conn(struct vport *p, struct vsock_conn *c)
{
	struct vbridge *b = p->clients;

	if (!b)
		return false;
	p->clients = b->wnext;
	b->st = BR_OPEN;
	b->conn = c;
	vsock_conn_set_ops(c, &bridge_ops, b);
	bridge_count(b, +1);
	/* inside the device's accept: bytes move once the loop sees the fd */
	bridge_watch(b, EPOLLIN | EPOLLOUT);
	return true;
}

static void hybrid_accept_ready(void *arg, uint32_t events)
{
	struct vmvsock *vs = arg;

	while (bridge_accept(vs, vs->hybrid_fd, UINT32_MAX, BR_COMMAND))
		;
}

int vexport_hybrid_open(struct vmvsock *vs)
{
	snprintf(vs->hybrid_path, sizeof(vs->hybrid_path), "%s/vsock.sock", vs->dir);
	vs->hybrid_fd = unix_listen_at(vs->vm, vs->hybrid_path);
	if (vs->hybrid_fd < 0)
		return vs->hybrid_fd;
	vs->hybrid_w = loop_watch_add(cfs.loop, vs->hybrid_fd, EPOLLIN, hybrid_accept_ready, vs);
	if (!vs->hybrid_w) {
		vexport_hybrid_close(vs);
		return -ENOMEM;
	}
	return 0;
}

void vexport_hybrid_close(struct vmvsock *vs)
{
	if (vs->hybrid_w) {
		loop_watch_del(vs->hybrid_w);
		vs->hybrid_w = NULL;
	}
	if (vs->hybrid_fd >= 0) {
		close(vs->hybrid_fd);
		vs->hybrid_fd = -1;
		unlink(vs->hybrid_path);
	}
}

void vexport_drop_all(struct vmvsock *vs)
{
	while (vs->bridges)
		bridge_free(vs->bridges);
}

int vexport_forward(struct vmvsock *vs, struct vsock_conn *c, uint32_t port)
{
	char path[PATH_MAX];
	struct vbridge *b;
	int fd, n;

	n = snprintf(path, sizeof(path), "%s/vsock.sock_%" PRIu32, vs->dir, port);
	if (n < 0 || (size_t)n >= sizeof(path))
		return -ECONNREFUSED;
	fd = unix_connect_at(path);
	if (fd < 0)
		return -ECONNREFUSED; /* no listener: the guest gets RST */
	b = bridge_new(vs, fd, port, BR_OPEN);
	if (!b) {
		close(fd);
		return -ECONNREFUSED;
	}
	b->conn = c;
	b->w = loop_watch_add(cfs.loop, fd, EPOLLIN | EPOLLOUT, bridge_event, b);
	if (!b->w) {
		b->conn = NULL;
		bridge_free(b);
		return -ECONNREFUSED;
	}
	vsock_conn_set_ops(c, &bridge_ops, b);
	return 0;
}
