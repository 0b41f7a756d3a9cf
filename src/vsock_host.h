/* Internal to the host side of vsock (vsock_ports.c, vsock_node.c,
 * vsock_export.c): a VM's declared ports, its device while it runs, and the
 * endpoints that carry connections to host programs. */
#ifndef CAPSAFS_VSOCK_HOST_H
#define CAPSAFS_VSOCK_HOST_H

#include <limits.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cred.h"
#include "pending.h"

struct vm;
struct vsock_conn;
struct vsock_dev;
struct loop_watch;
struct vbridge;

#define VPORT_BACKLOG 128 /* guest connections queued on a listen port */

enum vport_mode { VPORT_LISTEN, VPORT_CONNECT };

/* A guest connection waiting on a listen port for a host taker. */
struct vbacklog {
	struct vsock_conn *conn;
	struct vbacklog *next;
};

struct vport {
	struct vm *vm;
	uint32_t port;
	enum vport_mode mode;
	char *path; /* exported socket; NULL = SOCKDIR/<vm>/<port>.sock */
	struct cred cred; /* who declared it: a PATH is bound and removed as them */
	unsigned conns;
	struct vport *next; /* ascending by port */

	/* while the VM runs */
	int listen_fd;
	struct loop_watch *listen_w;
	char sockpath[PATH_MAX];
	struct vbacklog *backlog, **backlog_tail;
	unsigned backlog_len;
	struct plist openers;      /* FUSE opens waiting for a guest connection */
	struct vbridge *clients;   /* Unix clients waiting for one (FIFO) */
};

struct vmvsock {
	struct vm *vm;
	struct vport *ports;
	char dir[PATH_MAX / 2]; /* SOCKDIR/<vm> */
	int dirfd;              /* O_PATH fd of dir while running: binds go through
				 * /proc/self/fd/N/name, so sun_path's 108 bytes
				 * never limit a deep SOCKDIR or a long VM name */
	char devsock[64];       /* vhost-user socket, as the daemon binds it */
	struct vsock_dev *dev;
	/* the Firecracker-style hybrid socket */
	int hybrid_fd;
	struct loop_watch *hybrid_w;
	char hybrid_path[PATH_MAX];
	struct vbridge *bridges; /* every live Unix bridge */
};

struct vport *vport_find(struct vmvsock *vs, uint32_t port);

/* vsock_export.c */
/* The hybrid socket's "CONNECT <port>\n" line at the start of in[0..*inlen)
 * (cap bytes of room): 0 with *port set and the line removed (what followed
 * it stays in in), -EAGAIN for more bytes, -EINVAL for a bad line. */
int hybrid_parse_line(char *in, size_t cap, size_t *inlen, uint32_t *port);
/* Bind (listen) or connect a Unix socket at path, through a short
 * /proc/self/fd path when path is longer than sun_path allows. */
int unix_listen_at(struct vm *vm, const char *path);
int unix_connect_at(const char *path);
int vexport_port_open(struct vport *p);   /* create the port's socket */
void vexport_port_close(struct vport *p); /* remove it, drop waiting clients */
int vexport_hybrid_open(struct vmvsock *vs);
void vexport_hybrid_close(struct vmvsock *vs);
void vexport_drop_all(struct vmvsock *vs); /* every bridge goes */
/* a guest connection for a listen port: give it to a waiting Unix client */
bool vexport_take_guest_conn(struct vport *p, struct vsock_conn *c);
/* a guest connection on an undeclared port: vsock.sock_<port> listener? */
int vexport_forward(struct vmvsock *vs, struct vsock_conn *c, uint32_t port);

/* vsock_node.c */
/* a guest connection for a listen port: give it to a waiting FUSE open */
bool vnode_take_guest_conn(struct vport *p, struct vsock_conn *c);
void vnode_fail_openers(struct vport *p, int err);

/* vsock_ports.c */
struct vsock_dev *vmvsock_dev(struct vm *vm);
void vport_sockpath(struct vm *vm, const struct vport *p, char *buf, size_t len);
/* next queued guest connection of a listen port, or NULL */
struct vsock_conn *vport_backlog_pop(struct vport *p);

#endif
