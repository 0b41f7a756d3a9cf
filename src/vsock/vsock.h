/* The virtio-vsock device that capsafs serves to QEMU over vhost-user, and the
 * connection API the host side (FUSE nodes, exported Unix sockets) uses.
 *
 * Threading: everything runs in the loop thread or under the big lock (see
 * loop.h).  Callbacks are invoked with the big lock held and may call any
 * function here, including vsock_conn_close() on the conn they are called for.
 *
 * One struct vsock_dev per running VM.  It listens on a vhost-user Unix socket
 * (created by vsock_dev_new, before QEMU starts); QEMU connects once.  When QEMU
 * goes away (socket closed) every connection is reset with ECONNRESET. */
#ifndef CAPSAFS_VSOCK_H
#define CAPSAFS_VSOCK_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

struct loop;
struct vsock_dev;
struct vsock_conn;

#define VSOCK_HOST_CID 2
#define VSOCK_DEFAULT_MAX_CONNS 4096

/* Host endpoint callbacks for one connection. Every member may be NULL. */
struct vsock_conn_ops {
	/* Host-initiated connect: the guest answered RESPONSE. */
	void (*established)(struct vsock_conn *c, void *arg);
	/* Data or EOF (peer SHUTDOWN(SEND)) can now be read. */
	void (*readable)(struct vsock_conn *c, void *arg);
	/* Credit / buffer space opened up: vsock_conn_write may take more. */
	void (*writable)(struct vsock_conn *c, void *arg);
	/* The connection is gone: err is ECONNREFUSED (RST answering our REQUEST),
	 * ECONNRESET (RST, QEMU gone, device freed) or ETIMEDOUT.  After this the
	 * host side must call vsock_conn_close(c) (which then just frees it). */
	void (*closed)(struct vsock_conn *c, void *arg, int err);
	/* Optional: take data straight out of guest memory as it arrives, when
	 * nothing is buffered ahead of it (no copy into the connection's
	 * buffer).  iov describes len bytes and is valid only during the call.
	 * Return how many bytes were taken: the rest is buffered and announced
	 * with readable.  Must not call any vsock_* function. */
	size_t (*deliver)(struct vsock_conn *c, void *arg, const struct iovec *iov, int cnt,
			  size_t len);
};

/* A guest connected to host port `host_port` from `guest_port`.  Return 0 to
 * accept (the device answers RESPONSE right away; call vsock_conn_set_ops to
 * attach an endpoint, data is buffered meanwhile) or a negative errno to
 * refuse (the device answers RST). */
typedef int (*vsock_accept_fn)(void *arg, struct vsock_conn *c, uint32_t host_port,
			       uint32_t guest_port);

struct vsock_dev_config {
	uint64_t guest_cid;
	const char *socket_path; /* vhost-user listening socket to create */
	unsigned max_conns;      /* 0 = VSOCK_DEFAULT_MAX_CONNS */
	vsock_accept_fn accept;
	void *accept_arg;
	/* Added: 0 = defaults (5000 ms to finish a host close before RST,
	 * 10000 ms for the guest to answer a host connect). */
	unsigned close_timeout_ms;
	unsigned connect_timeout_ms;
};

struct vsock_dev *vsock_dev_new(struct loop *l, const struct vsock_dev_config *cfg);
/* Resets every connection (closed(ECONNRESET)), closes and unlinks the socket. */
void vsock_dev_free(struct vsock_dev *d);
/* Is a vhost-user frontend (QEMU) connected and the rings running? */
int vsock_dev_ready(const struct vsock_dev *d);

/* Dial the guest's port.  Returns the conn at once (REQUEST sent or queued);
 * ops->established or ops->closed(ECONNREFUSED/ENOTCONN) follows.  Returns
 * NULL with errno ENOTCONN when no frontend is connected, EMFILE past the
 * connection limit. */
struct vsock_conn *vsock_connect(struct vsock_dev *d, uint32_t guest_port,
				 const struct vsock_conn_ops *ops, void *arg);

void vsock_conn_set_ops(struct vsock_conn *c, const struct vsock_conn_ops *ops, void *arg);
uint32_t vsock_conn_local_port(const struct vsock_conn *c);
uint32_t vsock_conn_peer_port(const struct vsock_conn *c);

/* Bytes received from the guest and not yet read; EOF is signalled by
 * vsock_conn_read returning 0 once the buffer is empty and the guest shut
 * down its sending side. */
size_t vsock_conn_readable(const struct vsock_conn *c);
/* Returns bytes read, 0 at EOF, -EAGAIN when nothing is buffered yet,
 * -ECONNRESET after a reset.  Reading sends credit updates as needed. */
ssize_t vsock_conn_read(struct vsock_conn *c, void *buf, size_t len);
/* Zero-copy reading: describe up to len buffered bytes in at most max iovecs
 * (returns how many, 0 when nothing is buffered, -ECONNRESET after a reset),
 * then drop the first n bytes once they were used.  The iovecs stay valid
 * until the next call on c. */
int vsock_conn_peek(const struct vsock_conn *c, struct iovec *iov, int max, size_t len);
void vsock_conn_consume(struct vsock_conn *c, size_t n);
/* Reads straight from an fd into the guest (no intermediate copy) up to the
 * available credit: returns bytes moved, 0 on fd EOF, -EAGAIN, -errno. */
ssize_t vsock_conn_splice_from_fd(struct vsock_conn *c, int fd);
/* Writes buffered guest data to fd (MSG_NOSIGNAL for sockets). */
ssize_t vsock_conn_splice_to_fd(struct vsock_conn *c, int fd);

/* Queue bytes for the guest.  Returns bytes accepted (possibly fewer than len,
 * bounded by credit plus a small per-connection buffer), -EAGAIN when none,
 * -EPIPE once the guest shut down its receiving side or the conn is closed,
 * -ECONNRESET after a reset. */
ssize_t vsock_conn_write(struct vsock_conn *c, const void *buf, size_t len);
/* Room for vsock_conn_write right now. */
size_t vsock_conn_writable(const struct vsock_conn *c);

/* SHUT_WR: SHUTDOWN(SEND) after queued data is delivered; SHUT_RD likewise. */
int vsock_conn_shutdown(struct vsock_conn *c, int how);
/* Host side lets go: queued data is still delivered, then SHUTDOWN(both),
 * then RST if the guest does not answer within a short timeout.  No callback
 * is called after this. */
void vsock_conn_close(struct vsock_conn *c);

#endif
