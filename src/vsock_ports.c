/* Per-VM vsock state: port declarations, the vsock/ctl and vsock/ports
 * files, and the device's lifecycle around each run of the VM. */
#include "config.h"

#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <poll.h>
#include <sys/stat.h>

#include "capsafs.h"
#include "ctl.h"
#include "log.h"
#include "util.h"
#include "vm.h"
#include "vmvsock.h"
#include "vsock/vsock.h"
#include "vsock_host.h"
#include "loop.h"
#include <fcntl.h>
#include <sys/socket.h>

int vmvsock_init(struct vm *vm)
{
	struct vmvsock *vs = calloc(1, sizeof(*vs));

	if (!vs)
		return -ENOMEM;
	vs->vm = vm;
	vs->hybrid_fd = -1;
	snprintf(vs->dir, sizeof(vs->dir), "%s/%s", cfs.sockdir, vm->name);
	vs->dirfd = -1;
	vm->vsock = vs;
	return 0;
}

void vmvsock_fini(struct vm *vm)
{
	struct vmvsock *vs = vm->vsock;

	if (!vs)
		return;
	vmvsock_stopped(vm);
	while (vs->ports) {
		struct vport *p = vs->ports;
		vs->ports = p->next;
		free(p->path);
		free(p);
	}
	free(vs);
	vm->vsock = NULL;
}

void vmvsock_remove(struct vm *vm)
{
	rmdir(vm->vsock->dir);
}

/* ---- guest connections to host ports ---- */

static void backlog_closed(struct vsock_conn *c, void *arg, int err)
{
	struct vport *p = arg;
	struct vbacklog **pp, *b;

	for (pp = &p->backlog; (b = *pp); pp = &b->next) {
		if (b->conn != c)
			continue;
		*pp = b->next;
		if (p->backlog_tail == &b->next)
			p->backlog_tail = pp;
		p->backlog_len--;
		free(b);
		break;
	}
	vsock_conn_close(c);
}

static const struct vsock_conn_ops backlog_ops = {
	.closed = backlog_closed,
};

struct vsock_conn *vport_backlog_pop(struct vport *p)
{
	struct vbacklog *b = p->backlog;
	struct vsock_conn *c;

	if (!b)
		return NULL;
	p->backlog = b->next;
	if (!p->backlog)
		p->backlog_tail = &p->backlog;
	p->backlog_len--;
	c = b->conn;
	free(b);
	vsock_conn_set_ops(c, NULL, NULL);
	return c;
}

static void vport_backlog_drop(struct vport *p)
{
	struct vsock_conn *c;

	while ((c = vport_backlog_pop(p)))
		vsock_conn_close(c);
}

/* The device asks: a guest connects to host_port.  A listen port hands it to
 * a waiting FUSE open or Unix client, or queues it; other ports go to a
 * vsock.sock_<port> listener, Firecracker's convention, or are refused. */
static int vport_accept(void *arg, struct vsock_conn *c, uint32_t host_port, uint32_t guest_port)
{
	struct vmvsock *vs = arg;
	struct vport *p = vport_find(vs, host_port);
	struct vbacklog *b;

	if (!p || p->mode != VPORT_LISTEN)
		return vexport_forward(vs, c, host_port);
	if (vnode_take_guest_conn(p, c) || vexport_take_guest_conn(p, c))
		return 0;
	if (p->backlog_len >= VPORT_BACKLOG)
		return -ECONNREFUSED;
	b = calloc(1, sizeof(*b));
	if (!b)
		return -ENOMEM;
	b->conn = c;
	*p->backlog_tail = b;
	p->backlog_tail = &b->next;
	p->backlog_len++;
	vsock_conn_set_ops(c, &backlog_ops, p);
	return 0;
}

/* ---- lifecycle ---- */

static void vport_runtime_init(struct vport *p)
{
	p->listen_fd = -1;
	p->backlog_tail = &p->backlog;
}

static void vport_runtime_stop(struct vport *p)
{
	vexport_port_close(p);
	vnode_fail_openers(p, ECONNRESET);
	vport_backlog_drop(p);
}

int vmvsock_prepare(struct vm *vm)
{
	struct vmvsock *vs = vm->vsock;
	struct vsock_dev_config cfg = { 0 };
	struct vport *p;
	int r;

	if (mkdir(vs->dir, 0700) < 0 && errno != EEXIST)
		return vm_fail(vm, errno, "cannot create socket directory %s: %s", vs->dir,
			       strerror(errno));
	/* the VM's owner reaches its sockets; nobody else */
	if (geteuid() == 0 && chown(vs->dir, vm->uid, vm->gid) < 0)
		return vm_fail(vm, errno, "cannot chown %s: %s", vs->dir, strerror(errno));
	vs->dirfd = open(vs->dir, O_PATH | O_DIRECTORY | O_CLOEXEC);
	if (vs->dirfd < 0)
		return vm_fail(vm, errno, "cannot open %s: %s", vs->dir, strerror(errno));
	snprintf(vs->devsock, sizeof(vs->devsock), "/proc/self/fd/%d/.vhost-user.sock", vs->dirfd);
	cfg.guest_cid = vm->cid;
	cfg.socket_path = vs->devsock;
	cfg.accept = vport_accept;
	cfg.accept_arg = vs;
	vs->dev = vsock_dev_new(cfs.loop, &cfg);
	if (!vs->dev) {
		r = vm_fail(vm, errno ? errno : EIO, "cannot create the vsock device in %s: %s",
			    vs->dir, strerror(errno ? errno : EIO));
		vmvsock_stopped(vm);
		return r;
	}
	for (p = vs->ports; p; p = p->next) {
		r = vexport_port_open(p);
		if (r < 0)
			goto fail;
	}
	r = vexport_hybrid_open(vs);
	if (r < 0)
		goto fail;
	return 0;
fail:
	vmvsock_stopped(vm);
	return r;
}

const char *vmvsock_device_socket(struct vm *vm, int child_dirfd, char *buf, size_t len)
{
	if (!vm->vsock->dev)
		return NULL;
	snprintf(buf, len, "/proc/self/fd/%d/.vhost-user.sock", child_dirfd);
	return buf;
}

int vmvsock_dirfd(struct vm *vm)
{
	return vm->vsock->dev ? vm->vsock->dirfd : -1;
}

void vmvsock_stopped(struct vm *vm)
{
	struct vmvsock *vs = vm->vsock;
	struct vport *p;

	if (!vs)
		return;
	/* the device first: its resets reach every endpoint while they exist */
	if (vs->dev) {
		vsock_dev_free(vs->dev);
		vs->dev = NULL;
	}
	vexport_drop_all(vs);
	for (p = vs->ports; p; p = p->next)
		vport_runtime_stop(p);
	vexport_hybrid_close(vs);
	if (vs->dirfd >= 0) {
		close(vs->dirfd);
		vs->dirfd = -1;
	}
}

struct vsock_dev *vmvsock_dev(struct vm *vm)
{
	return vm->vsock->dev;
}

bool vmvsock_port_name(const char *name, uint32_t *port)
{
	uint64_t v;

	/* VMADDR_PORT_ANY (2^32-1) is not a port */
	if (parse_u64(name, strlen(name), 0, 0xfffffffeu, &v) < 0 || strchr(name, '\n'))
		return false;
	/* one spelling per port: "0042" is not port 42 */
	if (name[0] == '0' && name[1] != '\0')
		return false;
	*port = (uint32_t)v;
	return true;
}

struct vport *vport_find(struct vmvsock *vs, uint32_t port)
{
	struct vport *p;

	for (p = vs->ports; p; p = p->next)
		if (p->port == port)
			return p;
	return NULL;
}

size_t vmvsock_port_list(struct vm *vm, uint32_t *ports, size_t max)
{
	struct vport *p;
	size_t n = 0;

	for (p = vm->vsock->ports; p && n < max; p = p->next)
		ports[n++] = p->port;
	return n;
}

void vport_sockpath(struct vm *vm, const struct vport *p, char *buf, size_t len)
{
	int n = p->path ? snprintf(buf, len, "%s", p->path)
			: snprintf(buf, len, "%s/%" PRIu32 ".sock", vm->vsock->dir, p->port);

	if (n < 0 || (size_t)n >= len)
		buf[0] = '\0'; /* cannot happen: the directory is checked at mount */
}

size_t vmvsock_ports_show(struct vm *vm, char *buf, size_t len)
{
	struct vport *p;
	size_t used = 0;
	char path[PATH_MAX];

	for (p = vm->vsock->ports; p && used < len; p = p->next) {
		int n;
		vport_sockpath(vm, p, path, sizeof(path));
		n = snprintf(buf + used, len - used, "%" PRIu32 " %s %s %u\n", p->port,
			     p->mode == VPORT_LISTEN ? "listen" : "connect", path, p->conns);
		if (n < 0)
			break;
		used += (size_t)n;
	}
	return MIN(used, len);
}

static int port_arg(struct vm *vm, const char *s, uint32_t *port)
{
	uint64_t v;
	int r = parse_u64(s, strlen(s), 0, 0xfffffffeu, &v);

	if (r == -EINVAL)
		return vm_fail(vm, EINVAL, "vsock: '%s' is not a port number", s);
	if (r == -ERANGE)
		return vm_fail(vm, ERANGE, "vsock: port %s out of range (0..4294967294)", s);
	*port = (uint32_t)v;
	return 0;
}

/* A declared PATH is created, replaced and removed with the declarer's
 * credentials, never the daemon's: otherwise a user could make a root daemon
 * unlink and take over any socket on the host.  Checked now, and again by
 * the bind itself at every start. */
static int vsock_path_allowed(struct vm *vm, const char *path, const struct cred *who)
{
	__do_free char *dir = strdup(path);
	struct cred_saved saved;
	char *slash;
	int r;

	if (!dir)
		return -ENOMEM;
	slash = strrchr(dir, '/');
	if (slash == dir)
		slash[1] = '\0';
	else
		*slash = '\0';
	r = cred_enter(who, &saved);
	if (r < 0)
		return vm_fail(vm, -r, "vsock: only the mounting user may name socket paths "
				       "when capsafs does not run as root");
	r = faccessat(AT_FDCWD, dir, W_OK | X_OK, AT_EACCESS) < 0 ? -errno : 0;
	cred_leave(&saved);
	if (r < 0)
		return vm_fail(vm, -r, "vsock: cannot create a socket in %s: %s", dir, strerror(-r));
	return 0;
}

static int vsock_declare(struct vm *vm, int argc, char **argv, enum vport_mode mode,
			 const struct cred *who)
{
	struct vmvsock *vs = vm->vsock;
	struct vport *p, **pp;
	uint32_t port;
	int r = port_arg(vm, argv[0], &port);

	if (r < 0)
		return r;
	if (vport_find(vs, port))
		return vm_fail(vm, EEXIST, "vsock: port %" PRIu32 " is already declared", port);
	if (argc > 1 && argv[1][0] != '/')
		return vm_fail(vm, EINVAL, "vsock: socket path '%s' is not absolute", argv[1]);
	if (argc > 1 && (r = vsock_path_allowed(vm, argv[1], who)) < 0)
		return r;
	p = calloc(1, sizeof(*p));
	if (!p || (argc > 1 && !(p->path = strdup(argv[1])))) {
		free(p);
		return -ENOMEM;
	}
	p->vm = vm;
	p->port = port;
	p->mode = mode;
	p->cred = *who;
	vport_runtime_init(p);
	if (vs->dev) { /* running: the socket appears now */
		r = vexport_port_open(p);
		if (r < 0) {
			free(p->path);
			free(p);
			return r;
		}
	}
	for (pp = &vs->ports; *pp && (*pp)->port < port; pp = &(*pp)->next)
		;
	p->next = *pp;
	*pp = p;
	return 0;
}

static int cmd_listen(void *obj, int argc, char **argv, void *ctx)
{
	return vsock_declare(obj, argc, argv, VPORT_LISTEN, ctx);
}

static int cmd_connect(void *obj, int argc, char **argv, void *ctx)
{
	return vsock_declare(obj, argc, argv, VPORT_CONNECT, ctx);
}

static int cmd_close(void *obj, int argc, char **argv, void *ctx)
{
	struct vm *vm = obj;
	struct vport **pp, *p;
	uint32_t port;
	int r = port_arg(vm, argv[0], &port);

	if (r < 0)
		return r;
	for (pp = &vm->vsock->ports; *pp && (*pp)->port != port; pp = &(*pp)->next)
		;
	if (!*pp)
		return vm_fail(vm, ENOENT, "vsock: port %" PRIu32 " is not declared", port);
	p = *pp;
	*pp = p->next;
	vport_runtime_stop(p);
	free(p->path);
	free(p);
	return 0;
}

static const struct ctl_cmd vsock_ctl_cmds[] = {
	{ "listen", 1, 2, cmd_listen },
	{ "connect", 1, 2, cmd_connect },
	{ "close", 1, 1, cmd_close },
};

void vmvsock_ctl_write(struct vm *vm, fuse_req_t req, const char *buf, size_t size,
		       const struct cred *who)
{
	char err[256] = "";
	int r = ctl_run(vsock_ctl_cmds, ARRAY_SIZE(vsock_ctl_cmds), buf, size, vm, (void *)who,
			err, sizeof(err));

	if (r < 0) {
		if (err[0])
			vm_fail(vm, -r, "vsock/ctl: %s", err);
		fuse_reply_err(req, -r);
		return;
	}
	fuse_reply_write(req, size);
}

