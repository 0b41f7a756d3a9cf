/* vsock/<port> files: each open is one connection to the guest (dialled for
 * an ordinary port, accepted for a listen port), read/write/poll move its
 * bytes, and blocked calls are answered from the device's callbacks. */
#include "config.h"

#include <fcntl.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>

#include "fh.h"
#include "fs.h"
#include "log.h"
#include "util.h"
#include "vm.h"
#include "vmvsock.h"
#include "vsock/vring.h"
#include "vsock/vsock.h"
#include "vsock_host.h"

struct vstream {
	struct fh fh; /* first: fi->fh points here */
	struct vm *vm; /* holds a reference */
	uint32_t port;
	bool counted; /* in its declared port's CONNECTIONS */
	struct fuse_file_info fi; /* for the deferred open reply */
	struct vsock_conn *conn;
	int err; /* once the connection is gone: what calls get */
	struct pending *opening;
	struct plist connecting; /* holds opening while a dial is answered */
	struct plist readers, writers;
	struct fuse_pollhandle *ph;
};

/* A parked write keeps its bytes until the connection takes them all. */
struct vwrite {
	struct vstream *s;
	char *data;
	size_t len, off;
};

enum { PEND_OPEN = 1, PEND_READ, PEND_WRITE };

static const struct fh_ops vstream_fh_ops;

static void vstream_count(struct vstream *s, int delta)
{
	struct vport *p = vport_find(s->vm->vsock, s->port);

	if (delta > 0 && p && !s->counted) {
		p->conns++;
		s->counted = true;
	} else if (delta < 0 && s->counted) {
		if (p && p->conns > 0)
			p->conns--;
		s->counted = false;
	}
}

static void vstream_free(struct vstream *s)
{
	fh_untrack(&s->fh);
	vstream_count(s, -1);
	if (s->conn)
		vsock_conn_close(s->conn);
	if (s->ph)
		fuse_pollhandle_destroy(s->ph);
	vm_put(s->vm);
	free(s);
}

static void vstream_notify(struct vstream *s)
{
	if (s->ph) {
		fuse_lowlevel_notify_poll(s->ph);
		fuse_pollhandle_destroy(s->ph);
		s->ph = NULL;
	}
}

static void vstream_reply_open(struct vstream *s, fuse_req_t req)
{
	/* from here on the kernel owns s until it releases the file */
	fh_track(&s->fh, &vstream_fh_ops);
	s->fi.fh = (uint64_t)(uintptr_t)s;
	vstream_count(s, +1);
	fs_reply_open_stream(req, &s->fi);
}

/* Answer a read from the connection's buffers (one copy, into the kernel);
 * returns false when nothing is buffered yet. */
static bool vstream_reply_data(struct vstream *s, fuse_req_t req, size_t size)
{
	struct iovec iov[64];
	size_t n = 0;
	int cnt, i;

	cnt = vsock_conn_peek(s->conn, iov, (int)ARRAY_SIZE(iov), size);
	if (cnt <= 0)
		return false;
	for (i = 0; i < cnt; i++)
		n += iov[i].iov_len;
	fuse_reply_iov(req, iov, cnt);
	vsock_conn_consume(s->conn, n);
	return true;
}

/* Serve parked reads from the connection's buffer. */
static void vstream_serve_readers(struct vstream *s)
{
	while (!plist_empty(&s->readers)) {
		struct pending *p = s->readers.head;
		size_t size = p->size;
		char probe;
		ssize_t n;

		if (!s->conn) {
			fuse_reply_err(pending_take(p), s->err);
			continue;
		}
		if (size > 0 && vsock_conn_readable(s->conn) > 0) {
			fuse_req_t req = pending_take(p);
			vstream_reply_data(s, req, size);
			continue;
		}
		n = vsock_conn_read(s->conn, &probe, 0);
		if (n == -EAGAIN)
			break;
		if (n < 0)
			fuse_reply_err(pending_take(p), (int)-n);
		else
			fuse_reply_buf(pending_take(p), NULL, 0); /* EOF */
	}
}

static void vstream_serve_writers(struct vstream *s)
{
	while (!plist_empty(&s->writers)) {
		struct pending *p = s->writers.head;
		struct vwrite *w = p->handle;
		ssize_t n;

		if (!s->conn) {
			fuse_reply_err(pending_take(p), s->err == ECONNRESET ? ECONNRESET : EPIPE);
		} else {
			n = vsock_conn_write(s->conn, w->data + w->off, w->len - w->off);
			if (n == -EAGAIN)
				break;
			if (n < 0) {
				fuse_reply_err(pending_take(p), (int)-n);
			} else {
				w->off += (size_t)n;
				if (w->off < w->len)
					break;
				/* the whole write(2), including what went out at once */
				size_t size = p->size;
				fuse_reply_write(pending_take(p), size);
			}
		}
		free(w->data);
		free(w);
	}
}

static void vstream_established(struct vsock_conn *c, void *arg)
{
	struct vstream *s = arg;

	if (s->opening) {
		fuse_req_t req = pending_take(s->opening);
		s->opening = NULL;
		vstream_reply_open(s, req);
	}
}

static void vstream_readable(struct vsock_conn *c, void *arg)
{
	struct vstream *s = arg;

	vstream_serve_readers(s);
	vstream_notify(s);
}

static void vstream_writable(struct vsock_conn *c, void *arg)
{
	struct vstream *s = arg;

	vstream_serve_writers(s);
	vstream_notify(s);
}

static void vstream_closed(struct vsock_conn *c, void *arg, int err)
{
	struct vstream *s = arg;

	vsock_conn_close(c);
	s->conn = NULL;
	s->err = err ? err : ECONNRESET;
	if (s->opening) { /* the open never completed: nobody will release s */
		fuse_req_t req = pending_take(s->opening);
		s->opening = NULL;
		fuse_reply_err(req, s->err);
		vstream_free(s);
		return;
	}
	vstream_serve_readers(s);
	vstream_serve_writers(s);
	vstream_notify(s);
}

/* Guest data as it arrives, for reads already parked: answered straight from
 * guest memory (the one copy is into the kernel's reply). */
static size_t vstream_deliver(struct vsock_conn *c, void *arg, const struct iovec *iov, int cnt,
			      size_t len)
{
	struct vstream *s = arg;
	struct iovec part[64];
	size_t done = 0;

	while (done < len && !plist_empty(&s->readers) && s->readers.head->size > 0) {
		struct pending *p = s->readers.head;
		size_t want = MIN(p->size, len - done);
		unsigned n = iov_slice(iov, (unsigned)cnt, done, want, part, ARRAY_SIZE(part));
		size_t got = 0;

		for (unsigned i = 0; i < n; i++)
			got += part[i].iov_len;
		if (!got)
			break;
		fuse_reply_iov(pending_take(p), part, (int)n);
		done += got;
	}
	return done;
}

static const struct vsock_conn_ops vstream_ops = {
	.established = vstream_established,
	.readable = vstream_readable,
	.writable = vstream_writable,
	.closed = vstream_closed,
	.deliver = vstream_deliver,
};

static void vstream_open_cancel(struct pending *p)
{
	struct vstream *s = p->handle;

	s->opening = NULL;
	vstream_free(s);
}

static void vstream_attach(struct vstream *s, struct vsock_conn *c)
{
	s->conn = c;
	vsock_conn_set_ops(c, &vstream_ops, s);
}

bool vnode_take_guest_conn(struct vport *p, struct vsock_conn *c)
{
	struct vstream *s;
	fuse_req_t req;

	if (plist_empty(&p->openers))
		return false;
	s = p->openers.head->handle;
	req = pending_take(p->openers.head);
	s->opening = NULL;
	vstream_attach(s, c);
	vstream_reply_open(s, req);
	/* data may already be buffered */
	return true;
}

void vnode_fail_openers(struct vport *p, int err)
{
	while (!plist_empty(&p->openers)) {
		struct vstream *s = p->openers.head->handle;
		fuse_reply_err(pending_take(p->openers.head), err);
		s->opening = NULL;
		vstream_free(s);
	}
}

void vmvsock_open(struct vm *vm, uint32_t port, fuse_req_t req, struct fuse_file_info *fi)
{
	struct vsock_dev *dev = vmvsock_dev(vm);
	struct vport *p = vport_find(vm->vsock, port);
	struct vstream *s;
	struct vsock_conn *c;

	if (!dev || !vm->proc) {
		vm_fail(vm, ENOTCONN, "vsock: %s is not running", vm->name);
		fuse_reply_err(req, ENOTCONN);
		return;
	}
	s = calloc(1, sizeof(*s));
	if (!s) {
		fuse_reply_err(req, ENOMEM);
		return;
	}
	vm_get(vm);
	s->vm = vm;
	s->port = port;
	s->fi = *fi;
	if (p && p->mode == VPORT_LISTEN) {
		/* accept: the next guest connection to this host port */
		c = vport_backlog_pop(p);
		if (c) {
			vstream_attach(s, c);
			vstream_reply_open(s, req);
			return;
		}
		if (fi->flags & O_NONBLOCK) {
			vstream_free(s);
			fuse_reply_err(req, EAGAIN);
			return;
		}
		s->opening = pending_park_cancel(req, &p->openers, PEND_OPEN, 0, s,
						 vstream_open_cancel);
		if (!s->opening) {
			vstream_free(s);
			fuse_reply_err(req, ENOMEM);
		}
		return;
	}
	/* connect: dial the guest's port; the open returns once it accepted */
	c = vsock_connect(dev, port, &vstream_ops, s);
	if (!c) {
		int err = errno ? errno : ENOTCONN;
		vm_fail(vm, err, "vsock: cannot connect to guest port %u: %s", port, strerror(err));
		vstream_free(s);
		fuse_reply_err(req, err);
		return;
	}
	s->conn = c;
	s->opening = pending_park_cancel(req, &s->connecting, PEND_OPEN, 0, s, vstream_open_cancel);
	if (!s->opening) {
		vstream_free(s);
		fuse_reply_err(req, ENOMEM);
	}
}

static void vstream_read(struct fh *f, fuse_req_t req, size_t size, off_t off,
			 struct fuse_file_info *fi)
{
	struct vstream *s = container_of(f, struct vstream, fh);
	char probe;
	ssize_t n;

	if (!s->conn) {
		fuse_reply_err(req, s->err);
		return;
	}
	if (!plist_empty(&s->readers) && !(fi->flags & O_NONBLOCK)) {
		/* keep the order of readers */
		if (!pending_park(req, &s->readers, PEND_READ, size, s))
			fuse_reply_err(req, ENOMEM);
		return;
	}
	if (size > 0 && vstream_reply_data(s, req, size))
		return;
	n = vsock_conn_read(s->conn, &probe, 0); /* nothing buffered: EOF, reset or wait */
	if (n >= 0) {
		fuse_reply_buf(req, NULL, 0);
	} else if (n == -EAGAIN && !(fi->flags & O_NONBLOCK)) {
		if (!pending_park(req, &s->readers, PEND_READ, size, s))
			fuse_reply_err(req, ENOMEM);
	} else {
		fuse_reply_err(req, (int)-n);
	}
}

static void vstream_write(struct fh *f, fuse_req_t req, const char *buf, size_t size, off_t off,
			  struct fuse_file_info *fi)
{
	struct vstream *s = container_of(f, struct vstream, fh);
	struct vwrite *w;
	ssize_t n = 0;

	if (!s->conn) {
		fuse_reply_err(req, s->err == ECONNRESET ? ECONNRESET : EPIPE);
		return;
	}
	if (plist_empty(&s->writers)) {
		n = vsock_conn_write(s->conn, buf, size);
		if (n < 0 && n != -EAGAIN) {
			fuse_reply_err(req, (int)-n);
			return;
		}
		if (n < 0)
			n = 0;
		if ((size_t)n == size || (fi->flags & O_NONBLOCK)) {
			if (n == 0 && size > 0)
				fuse_reply_err(req, EAGAIN);
			else
				fuse_reply_write(req, (size_t)n);
			return;
		}
	} else if (fi->flags & O_NONBLOCK) {
		fuse_reply_err(req, EAGAIN);
		return;
	}
	/* blocking: the rest waits for credit, and the write returns when all
	 * of it is queued, so nothing a writer was told is sent gets lost */
	w = calloc(1, sizeof(*w));
	if (w)
		w->data = malloc(size - (size_t)n);
	if (!w || !w->data) {
		free(w);
		if (n > 0)
			fuse_reply_write(req, (size_t)n);
		else
			fuse_reply_err(req, ENOMEM);
		return;
	}
	memcpy(w->data, buf + n, size - (size_t)n);
	w->s = s;
	w->len = size - (size_t)n;
	/* the reply counts the whole write */
	w->off = 0;
	if (!pending_park(req, &s->writers, PEND_WRITE, size, w)) {
		free(w->data);
		free(w);
		fuse_reply_err(req, ENOMEM);
	}
}

static void vstream_poll(struct fh *f, fuse_req_t req, struct fuse_file_info *fi,
			 struct fuse_pollhandle *ph)
{
	struct vstream *s = container_of(f, struct vstream, fh);
	unsigned revents = 0;

	if (!s->conn) {
		revents = POLLIN | POLLRDNORM | POLLERR | POLLHUP;
	} else {
		ssize_t r = vsock_conn_readable(s->conn) > 0 ? 1 : 0;
		char probe;
		if (r || vsock_conn_read(s->conn, &probe, 0) == 0)
			revents |= POLLIN | POLLRDNORM;
		if (vsock_conn_writable(s->conn) > 0)
			revents |= POLLOUT | POLLWRNORM;
	}
	if (ph) {
		if (s->ph)
			fuse_pollhandle_destroy(s->ph);
		s->ph = ph;
	}
	fuse_reply_poll(req, revents);
}

/* close(): queued data still goes out, then a clean shutdown */
static void vstream_release(struct fh *f)
{
	vstream_free(container_of(f, struct vstream, fh));
}

static const struct fh_ops vstream_fh_ops = {
	.read = vstream_read,
	.write = vstream_write,
	.poll = vstream_poll,
	.release = vstream_release,
};
