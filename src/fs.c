/* The fuse_lowlevel_ops table: every request is dispatched by node kind and
 * gets exactly one reply, now or (for blocking reads and ctl commands) later
 * from the loop thread. */
#include "config.h"

#include <fcntl.h>
#include <poll.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>

#include "attr.h"
#include "capsafs.h"
#include "cred.h"
#include "fh.h"
#include "fs.h"
#include "log.h"
#include "loop.h"
#include "node.h"
#include "qemu.h"
#include "util.h"
#include "vm.h"
#include "vmvsock.h"

/* An open attribute, ctl, console or log file (fi->fh). */
struct handle {
	struct fh fh; /* first: fi->fh points here */
	struct node *n;
	int flags;
	char *snap; /* what a read shows, made at the first read from offset 0 */
	size_t snap_len;
	char *wbuf; /* what this open wrote so far (a value may come in pieces) */
	size_t wlen;
	uint64_t con_off;  /* console: next byte to read */
	uint64_t seen_gen; /* state: generation the reader last saw */
	struct fuse_pollhandle *ph;
	struct handle *pnext, **pprev; /* in vm->pollers while ph is set */
};

struct dirent_snap {
	char name[VM_NAME_MAX + 16];
	fuse_ino_t ino;
	mode_t mode;
};

struct dir_handle {
	struct fh fh;
	struct dirent_snap *ents;
	size_t n;
};

static const double entry_timeout = 0.0; /* the tree changes under mkdir/rmdir/ctl */

/* The kernel's open reply (struct fuse_open_out) and flags from linux/fuse.h. */
struct open_reply {
	uint64_t fh;
	uint32_t open_flags;
	int32_t unused;
};
#define OPEN_DIRECT_IO (1u << 0)
#define OPEN_NONSEEKABLE (1u << 2)
#define OPEN_STREAM (1u << 4)
#define OPEN_PARALLEL_DIRECT_WRITES (1u << 6)

int fs_reply_open_stream(fuse_req_t req, const struct fuse_file_info *fi)
{
	struct open_reply out = {
		.fh = fi->fh,
		.open_flags = OPEN_DIRECT_IO | OPEN_NONSEEKABLE | OPEN_STREAM |
			      OPEN_PARALLEL_DIRECT_WRITES,
	};
	struct iovec iov = { .iov_base = &out, .iov_len = sizeof(out) };

	return fuse_reply_iov(req, &iov, 1);
}

/* ---- attributes of nodes ---- */

static void node_stat(const struct node *n, struct stat *st)
{
	struct vm *vm = n->vm;

	memset(st, 0, sizeof(*st));
	st->st_ino = n->ino;
	st->st_nlink = 1;
	if (n->kind == NODE_ROOT) {
		st->st_mode = S_IFDIR | cfs.root_mode;
		st->st_nlink = 2;
		st->st_uid = cfs.uid;
		st->st_gid = cfs.gid;
		st->st_ctim = st->st_mtim = st->st_atim = cfs.mount_time;
		return;
	}
	st->st_uid = vm->uid;
	st->st_gid = vm->gid;
	st->st_ctim = vm->ctime;
	st->st_mtim = vm->mtime;
	st->st_atim = vm->mtime;
	switch (n->kind) {
	case NODE_VM:
		st->st_mode = S_IFDIR | 0755;
		st->st_nlink = 3;
		break;
	case NODE_VSOCK_DIR:
		st->st_mode = S_IFDIR | 0755;
		st->st_nlink = 2;
		break;
	case NODE_ATTR:
		st->st_mode = S_IFREG | attr_table[n->attr].mode;
		/* sysfs style: a page, so tools that trust st_size still read; the
		 * console and its log are 0 like /proc files (tail must not seek) */
		st->st_size = attr_table[n->attr].kind == ATTR_CONSOLE ||
					      attr_table[n->attr].kind == ATTR_LOG
				      ? 0
				      : 4096;
		break;
	case NODE_VSOCK_CTL:
		st->st_mode = S_IFREG | 0200;
		break;
	case NODE_VSOCK_PORTS:
		st->st_mode = S_IFREG | 0444;
		st->st_size = 4096;
		break;
	case NODE_VSOCK_PORT:
		st->st_mode = S_IFREG | 0600;
		break;
	case NODE_ROOT:
		break;
	}
}

static void node_owner(const struct node *n, uid_t *uid, gid_t *gid, mode_t *mode)
{
	struct stat st;

	node_stat(n, &st);
	*uid = st.st_uid;
	*gid = st.st_gid;
	*mode = st.st_mode;
}

/* Unix permission check (the mount need not use default_permissions). */
static bool may_access(fuse_req_t req, const struct node *n, int mask)
{
	struct cred c;
	uid_t uid;
	gid_t gid;
	mode_t mode, bits;

	cred_from_req(req, &c);
	if (c.uid == 0)
		return true;
	node_owner(n, &uid, &gid, &mode);
	if (c.uid == uid)
		bits = (mode >> 6) & 7;
	else if (cred_in_group(&c, gid))
		bits = (mode >> 3) & 7;
	else
		bits = mode & 7;
	return (bits & (mode_t)mask) == (mode_t)mask;
}

static void reply_entry(fuse_req_t req, struct node *n)
{
	struct fuse_entry_param e = { 0 };

	if (!n) {
		fuse_reply_err(req, ENOMEM);
		return;
	}
	e.ino = n->ino;
	e.attr_timeout = entry_timeout;
	e.entry_timeout = entry_timeout;
	node_stat(n, &e.attr);
	n->nlookup++;
	fuse_reply_entry(req, &e);
}

static struct node *node_get(fuse_ino_t ino)
{
	struct node *n = node_by_ino(ino);

	return n && !n->dead ? n : NULL;
}

/* ---- lookup, getattr, setattr ---- */

static void fs_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	struct node *p, *n = NULL;
	struct vm *vm;
	uint32_t port;
	int saverr = ENOENT, a;

	big_lock();
	p = node_get(parent);
	if (!p)
		goto out;
	switch (p->kind) {
	case NODE_ROOT:
		vm = vm_find(name);
		if (vm)
			n = node_vm_child(vm, NODE_VM, 0, 0);
		break;
	case NODE_VM:
		a = attr_find(name);
		if (a >= 0)
			n = node_vm_child(p->vm, NODE_ATTR, a, 0);
		else if (strcmp(name, "vsock") == 0)
			n = node_vm_child(p->vm, NODE_VSOCK_DIR, 0, 0);
		break;
	case NODE_VSOCK_DIR:
		if (strcmp(name, "ctl") == 0)
			n = node_vm_child(p->vm, NODE_VSOCK_CTL, 0, 0);
		else if (strcmp(name, "ports") == 0)
			n = node_vm_child(p->vm, NODE_VSOCK_PORTS, 0, 0);
		else if (vmvsock_port_name(name, &port))
			n = node_vm_child(p->vm, NODE_VSOCK_PORT, 0, port);
		break;
	default:
		saverr = ENOTDIR;
		goto out;
	}
	if (n) {
		reply_entry(req, n);
		big_unlock();
		return;
	}
out:
	big_unlock();
	fuse_reply_err(req, saverr);
}

static void fs_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup)
{
	struct node *n;

	big_lock();
	n = node_by_ino(ino);
	if (n)
		node_forget(n, nlookup);
	big_unlock();
	fuse_reply_none(req);
}

static void fs_forget_multi(fuse_req_t req, size_t count, struct fuse_forget_data *forgets)
{
	size_t i;

	big_lock();
	for (i = 0; i < count; i++) {
		struct node *n = node_by_ino(forgets[i].ino);
		if (n)
			node_forget(n, forgets[i].nlookup);
	}
	big_unlock();
	fuse_reply_none(req);
}

static void fs_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct node *n;
	struct stat st;

	big_lock();
	n = node_get(ino);
	if (n)
		node_stat(n, &st);
	big_unlock();
	if (!n)
		fuse_reply_err(req, ENOENT);
	else
		fuse_reply_attr(req, &st, entry_timeout);
}

static void fs_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set,
		       struct fuse_file_info *fi)
{
	struct node *n;
	struct stat st;
	struct cred c;
	int saverr = 0;

	cred_from_req(req, &c);
	big_lock();
	n = node_get(ino);
	if (!n) {
		saverr = ENOENT;
		goto out;
	}
	/* O_TRUNC on an attribute file: a no-op, the write that follows is the value */
	to_set &= ~(FUSE_SET_ATTR_SIZE | FUSE_SET_ATTR_ATIME | FUSE_SET_ATTR_MTIME |
		    FUSE_SET_ATTR_ATIME_NOW | FUSE_SET_ATTR_MTIME_NOW | FUSE_SET_ATTR_CTIME);
	if (to_set & FUSE_SET_ATTR_MODE) {
		/* only the root's mode may change (chmod 1777 to share it) */
		if (n->kind != NODE_ROOT) {
			saverr = EPERM;
			goto out;
		}
		if (c.uid != 0 && c.uid != cfs.uid) {
			saverr = EPERM;
			goto out;
		}
		cfs.root_mode = attr->st_mode & 07777;
		to_set &= ~FUSE_SET_ATTR_MODE;
	}
	if (to_set) { /* chown and friends: the tree's ownership is fixed */
		saverr = EPERM;
		goto out;
	}
	node_stat(n, &st);
out:
	big_unlock();
	if (saverr)
		fuse_reply_err(req, saverr);
	else
		fuse_reply_attr(req, &st, entry_timeout);
}

static void fs_access(fuse_req_t req, fuse_ino_t ino, int mask)
{
	struct node *n;
	int saverr = 0;

	big_lock();
	n = node_get(ino);
	if (!n)
		saverr = ENOENT;
	else if (mask != F_OK && !may_access(req, n, mask))
		saverr = EACCES;
	big_unlock();
	fuse_reply_err(req, saverr);
}

/* ---- mkdir / rmdir: making and destroying VMs ---- */

static void fs_mkdir(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode)
{
	const struct fuse_ctx *ctx = fuse_req_ctx(req);
	struct node *p;
	struct vm *vm;
	int saverr = 0, r;

	big_lock();
	p = node_get(parent);
	if (!p) {
		saverr = ENOENT;
		goto out;
	}
	if (p->kind != NODE_ROOT) {
		saverr = EPERM; /* VMs are made at the top only */
		goto out;
	}
	if (!may_access(req, p, W_OK | X_OK)) {
		saverr = EACCES;
		goto out;
	}
	r = vm_create(name, ctx->uid, ctx->gid, &vm);
	if (r < 0) {
		saverr = -r;
		goto out;
	}
	log_info("%s: created by uid %d", name, (int)ctx->uid);
	reply_entry(req, node_vm_child(vm, NODE_VM, 0, 0));
	big_unlock();
	return;
out:
	big_unlock();
	fuse_reply_err(req, saverr);
}

static void fs_rmdir(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	const struct fuse_ctx *ctx = fuse_req_ctx(req);
	struct node *p;
	struct vm *vm;
	int saverr = 0;

	big_lock();
	p = node_get(parent);
	if (!p) {
		saverr = ENOENT;
		goto out;
	}
	if (p->kind != NODE_ROOT) {
		/* the directories inside a VM are part of it */
		saverr = p->kind == NODE_VM || p->kind == NODE_VSOCK_DIR ? EPERM : ENOTDIR;
		goto out;
	}
	vm = vm_find(name);
	if (!vm) {
		saverr = ENOENT;
		goto out;
	}
	if (!may_access(req, p, W_OK | X_OK)) {
		saverr = EACCES;
		goto out;
	}
	/* sticky root (1777): only the VM's owner, the root's owner or root */
	if ((cfs.root_mode & S_ISVTX) && ctx->uid != 0 && ctx->uid != vm->uid &&
	    ctx->uid != cfs.uid) {
		saverr = EPERM;
		goto out;
	}
	saverr = -vm_remove(vm);
	if (saverr == 0)
		log_info("%s: removed", name);
out:
	big_unlock();
	fuse_reply_err(req, saverr);
}

static void fs_mknod(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode,
		     dev_t rdev)
{
	fuse_reply_err(req, EPERM);
}

static void fs_create(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode,
		      struct fuse_file_info *fi)
{
	fuse_reply_err(req, EPERM);
}

static void fs_unlink(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	fuse_reply_err(req, EPERM);
}

static void fs_symlink(fuse_req_t req, const char *link, fuse_ino_t parent, const char *name)
{
	fuse_reply_err(req, EPERM);
}

static void fs_link(fuse_req_t req, fuse_ino_t ino, fuse_ino_t newparent, const char *newname)
{
	fuse_reply_err(req, EPERM);
}

static void fs_rename(fuse_req_t req, fuse_ino_t parent, const char *name, fuse_ino_t newparent,
		      const char *newname, unsigned int flags)
{
	fuse_reply_err(req, EPERM);
}

/* ---- directories ---- */

static int snap_add(struct dir_handle *d, size_t *cap, const char *name, fuse_ino_t ino,
		    mode_t mode)
{
	if (d->n == *cap) {
		size_t ncap = *cap ? *cap * 2 : 32;
		struct dirent_snap *e = realloc(d->ents, ncap * sizeof(*e));
		if (!e)
			return -ENOMEM;
		d->ents = e;
		*cap = ncap;
	}
	snprintf(d->ents[d->n].name, sizeof(d->ents[d->n].name), "%s", name);
	d->ents[d->n].ino = ino;
	d->ents[d->n].mode = mode;
	d->n++;
	return 0;
}

static int snap_node(struct dir_handle *d, size_t *cap, const char *name, struct node *n,
		     mode_t mode)
{
	return n ? snap_add(d, cap, name, n->ino, mode) : -ENOMEM;
}

static int dir_snapshot(struct node *n, struct dir_handle *d)
{
	size_t cap = 0, i;
	char name[16];
	int r = 0;

	r |= snap_add(d, &cap, ".", n->ino, S_IFDIR);
	switch (n->kind) {
	case NODE_ROOT: {
		struct vm *vm;
		r |= snap_add(d, &cap, "..", n->ino, S_IFDIR);
		for (vm = cfs.vms; vm; vm = vm->next)
			r |= snap_node(d, &cap, vm->name, node_vm_child(vm, NODE_VM, 0, 0), S_IFDIR);
		break;
	}
	case NODE_VM:
		r |= snap_add(d, &cap, "..", FUSE_ROOT_ID, S_IFDIR);
		for (i = 0; i < attr_count; i++)
			r |= snap_node(d, &cap, attr_table[i].name,
				       node_vm_child(n->vm, NODE_ATTR, (int)i, 0), S_IFREG);
		r |= snap_node(d, &cap, "vsock", node_vm_child(n->vm, NODE_VSOCK_DIR, 0, 0), S_IFDIR);
		break;
	case NODE_VSOCK_DIR: {
		uint32_t ports[1024];
		size_t np = vmvsock_port_list(n->vm, ports, ARRAY_SIZE(ports));
		struct node *up = node_vm_child(n->vm, NODE_VM, 0, 0);
		r |= up ? snap_add(d, &cap, "..", up->ino, S_IFDIR) : -ENOMEM;
		r |= snap_node(d, &cap, "ctl", node_vm_child(n->vm, NODE_VSOCK_CTL, 0, 0), S_IFREG);
		r |= snap_node(d, &cap, "ports", node_vm_child(n->vm, NODE_VSOCK_PORTS, 0, 0),
			       S_IFREG);
		for (i = 0; i < np; i++) {
			snprintf(name, sizeof(name), "%u", ports[i]);
			r |= snap_node(d, &cap, name,
				       node_vm_child(n->vm, NODE_VSOCK_PORT, 0, ports[i]), S_IFREG);
		}
		break;
	}
	default:
		return -ENOTDIR;
	}
	return r ? -ENOMEM : 0;
}

static void dir_release(struct fh *f)
{
	struct dir_handle *d = container_of(f, struct dir_handle, fh);

	free(d->ents);
	free(d);
}

static const struct fh_ops dir_ops = { .release = dir_release };

static void fs_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct dir_handle *d = calloc(1, sizeof(*d));
	struct node *n;
	int saverr = 0, r;

	if (!d) {
		fuse_reply_err(req, ENOMEM);
		return;
	}
	big_lock();
	n = node_get(ino);
	if (!n)
		saverr = ENOENT;
	else if (!may_access(req, n, R_OK))
		saverr = EACCES;
	else if ((r = dir_snapshot(n, d)) < 0)
		saverr = -r;
	big_unlock();
	if (saverr) {
		free(d->ents);
		free(d);
		fuse_reply_err(req, saverr);
		return;
	}
	big_lock();
	fh_track(&d->fh, &dir_ops);
	big_unlock();
	fi->fh = (uint64_t)(uintptr_t)d;
	fuse_reply_open(req, fi);
}

static void fs_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
		       struct fuse_file_info *fi)
{
	struct dir_handle *d = container_of(fh_of(fi), struct dir_handle, fh);
	__do_free char *buf = malloc(size);
	size_t used = 0;
	off_t i;

	if (!buf) {
		fuse_reply_err(req, ENOMEM);
		return;
	}
	for (i = off; i >= 0 && (size_t)i < d->n; i++) {
		struct stat st = { .st_ino = d->ents[i].ino, .st_mode = d->ents[i].mode };
		size_t len = fuse_add_direntry(req, buf + used, size - used, d->ents[i].name, &st,
					       i + 1);
		if (len > size - used)
			break;
		used += len;
	}
	fuse_reply_buf(req, buf, used);
}

static void fs_releasedir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	big_lock();
	fh_release(fh_of(fi));
	big_unlock();
	fuse_reply_err(req, 0);
}

/* ---- files ---- */

static void poller_unlink(struct handle *h)
{
	if (h->pprev) {
		*h->pprev = h->pnext;
		if (h->pnext)
			h->pnext->pprev = h->pprev;
		h->pprev = NULL;
		h->pnext = NULL;
	}
	if (h->ph) {
		fuse_pollhandle_destroy(h->ph);
		h->ph = NULL;
	}
}

void fs_notify_pollers(struct vm *vm)
{
	while (vm->pollers) {
		struct handle *h = vm->pollers;
		if (h->ph)
			fuse_lowlevel_notify_poll(h->ph);
		poller_unlink(h);
	}
}

static size_t console_reply(struct vm *vm, struct handle *h, fuse_req_t req, size_t size)
{
	__do_free char *buf = malloc(size ? size : 1);
	size_t n;

	if (!buf) {
		fuse_reply_err(req, ENOMEM);
		return 1;
	}
	n = console_read(&vm->con, &h->con_off, buf, size);
	if (n > 0)
		fuse_reply_buf(req, buf, n);
	return n;
}

void fs_console_wakeup(struct vm *vm)
{
	struct pending *p = vm->console_readers.head, *next;

	for (; p; p = next) {
		struct handle *h = p->handle;
		next = p->qnext;
		if (h->con_off >= vm->con.total)
			continue;
		{
			size_t size = p->size;
			fuse_req_t req = pending_take(p);
			console_reply(vm, h, req, size);
		}
	}
	fs_notify_pollers(vm);
}

static const struct fh_ops file_ops;

static void fs_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct handle *h;
	struct node *n;
	int acc = fi->flags & O_ACCMODE, mask, saverr = 0;

	mask = acc == O_RDONLY ? R_OK : acc == O_WRONLY ? W_OK : R_OK | W_OK;
	big_lock();
	n = node_get(ino);
	if (!n) {
		saverr = ENOENT;
		goto out;
	}
	if (n->kind == NODE_ROOT || n->kind == NODE_VM || n->kind == NODE_VSOCK_DIR) {
		saverr = EISDIR;
		goto out;
	}
	if (!may_access(req, n, mask)) {
		saverr = EACCES;
		goto out;
	}
	if (n->kind == NODE_VSOCK_PORT) {
		vmvsock_open(n->vm, n->port, req, fi); /* answers, maybe later */
		big_unlock();
		return;
	}
	h = calloc(1, sizeof(*h));
	if (!h) {
		saverr = ENOMEM;
		goto out;
	}
	h->n = n;
	h->flags = fi->flags;
	fi->direct_io = 1; /* values are generated: never cache them */
	if (n->kind == NODE_ATTR) {
		switch (attr_table[n->attr].kind) {
		case ATTR_CONSOLE:
			h->con_off = console_first(&n->vm->con);
			fi->nonseekable = 1;
			break;
		case ATTR_LOG: {
			struct console *c = &n->vm->con;
			uint64_t off = console_first(c);
			size_t len = (size_t)(c->total - off);
			h->snap = malloc(len ? len : 1);
			if (!h->snap) {
				free(h);
				saverr = ENOMEM;
				goto out;
			}
			h->snap_len = console_read(c, &off, h->snap, len);
			break;
		}
		case ATTR_STATE:
			h->seen_gen = n->vm->state_gen;
			break;
		default:
			break;
		}
	}
	fh_track(&h->fh, &file_ops);
	fi->fh = (uint64_t)(uintptr_t)h;
	if (n->kind == NODE_VSOCK_CTL ||
	    (n->kind == NODE_ATTR && (attr_table[n->attr].kind == ATTR_CTL ||
				      attr_table[n->attr].kind == ATTR_CONSOLE)))
		fs_reply_open_stream(req, fi);
	else
		fuse_reply_open(req, fi);
	big_unlock();
	return;
out:
	big_unlock();
	fuse_reply_err(req, saverr);
}

/* Make the text a read from offset 0 shows. */
static int handle_snapshot(struct handle *h)
{
	struct node *n = h->n;
	char buf[8192];
	size_t len = 0;

	if (n->kind == NODE_ATTR) {
		const struct attr_def *a = &attr_table[n->attr];
		if (a->kind == ATTR_LOG)
			return 0; /* made at open */
		if (!a->show)
			return -EINVAL;
		len = a->show(n->vm, buf, sizeof(buf));
		if (a->kind == ATTR_STATE)
			h->seen_gen = n->vm->state_gen;
	} else if (n->kind == NODE_VSOCK_PORTS) {
		len = vmvsock_ports_show(n->vm, buf, sizeof(buf));
	} else {
		return -EINVAL;
	}
	len = MIN(len, sizeof(buf) - 1);
	free(h->snap);
	h->snap = malloc(len ? len : 1);
	if (!h->snap)
		return -ENOMEM;
	memcpy(h->snap, buf, len);
	h->snap_len = len;
	return 0;
}

static void file_read(struct fh *f, fuse_req_t req, size_t size, off_t off,
		      struct fuse_file_info *fi)
{
	struct handle *h = container_of(f, struct handle, fh);
	struct node *n = h->n;
	int saverr = 0, r;

	if (n->dead) {
		saverr = ENODEV;
		goto out;
	}
	if (n->kind == NODE_ATTR && attr_table[n->attr].kind == ATTR_CONSOLE) {
		if (console_reply(n->vm, h, req, size) > 0)
			return;
		if (fi->flags & O_NONBLOCK) {
			saverr = EAGAIN;
			goto out;
		}
		if (pending_park(req, &n->vm->console_readers, 0, size, h))
			return;
		saverr = ENOMEM;
		goto out;
	}
	if (off == 0 || !h->snap) {
		r = handle_snapshot(h);
		if (r < 0) {
			saverr = -r;
			goto out;
		}
	}
	if ((size_t)off >= h->snap_len)
		fuse_reply_buf(req, NULL, 0);
	else
		fuse_reply_buf(req, h->snap + off, MIN(size, h->snap_len - (size_t)off));
	return;
out:
	fuse_reply_err(req, saverr);
}

static void file_write(struct fh *f, fuse_req_t req, const char *buf, size_t size, off_t off,
		       struct fuse_file_info *fi)
{
	struct handle *h = container_of(f, struct handle, fh);
	const struct attr_def *a;
	struct node *n = h->n;
	struct cred c;
	ssize_t w;
	int saverr = 0, r;

	cred_from_req(req, &c);
	if (n->dead) {
		saverr = ENODEV;
		goto out;
	}
	if (n->kind == NODE_VSOCK_CTL) {
		vmvsock_ctl_write(n->vm, req, buf, size, &c);
		return;
	}
	if (n->kind != NODE_ATTR) {
		saverr = EBADF;
		goto out;
	}
	a = &attr_table[n->attr];
	switch (a->kind) {
	case ATTR_CTL:
		vm_ctl_write(n->vm, req, buf, size, &c);
		return;
	case ATTR_CONSOLE:
		if (!n->vm->proc) {
			saverr = -vm_fail(n->vm, ENOTCONN, "console: %s is not running", n->vm->name);
			goto out;
		}
		w = qemu_console_write(n->vm->proc, buf, size);
		if (w < 0) {
			saverr = (int)-w;
			goto out;
		}
		fuse_reply_write(req, (size_t)w);
		return;
	case ATTR_VALUE:
		if (!a->store) {
			saverr = EACCES;
			goto out;
		}
		break;
	default:
		saverr = EACCES;
		goto out;
	}
	/* A value: this write plus what this open wrote before it (from offset 0). */
	if (off == 0)
		h->wlen = 0;
	if ((size_t)off != h->wlen) {
		saverr = -vm_fail(n->vm, EINVAL, "%s: write the whole value at once", a->name);
		goto out;
	}
	if (size > ATTR_VALUE_MAX - h->wlen) {
		saverr = -vm_fail(n->vm, EINVAL, "%s: value longer than %d bytes", a->name,
				  ATTR_VALUE_MAX);
		goto out;
	}
	if (!h->wbuf && !(h->wbuf = malloc(ATTR_VALUE_MAX))) {
		saverr = ENOMEM;
		goto out;
	}
	memcpy(h->wbuf + h->wlen, buf, size);
	r = a->store(n->vm, h->wbuf, h->wlen + size, &c);
	if (r < 0) {
		saverr = -r;
		goto out;
	}
	h->wlen += size;
	fuse_reply_write(req, size);
	return;
out:
	fuse_reply_err(req, saverr);
}

static void file_poll(struct fh *f, fuse_req_t req, struct fuse_file_info *fi,
		      struct fuse_pollhandle *ph)
{
	struct handle *h = container_of(f, struct handle, fh);
	unsigned revents = 0;
	struct node *n = h->n;
	struct vm *vm = n->vm;

	if (n->dead) {
		revents = POLLERR | POLLHUP;
	} else if (n->kind == NODE_ATTR && attr_table[n->attr].kind == ATTR_STATE) {
		/* the cgroup.events convention: a change is POLLPRI|POLLERR */
		revents = POLLIN | POLLRDNORM;
		if (vm->state_gen != h->seen_gen)
			revents |= POLLPRI | POLLERR;
	} else if (n->kind == NODE_ATTR && attr_table[n->attr].kind == ATTR_CONSOLE) {
		if (h->con_off < vm->con.total)
			revents |= POLLIN | POLLRDNORM;
		if (vm->proc)
			revents |= POLLOUT | POLLWRNORM;
	} else {
		revents = POLLIN | POLLRDNORM | POLLOUT | POLLWRNORM;
	}
	if (ph) {
		if (h->ph)
			poller_unlink(h);
		if (!n->dead) {
			h->ph = ph;
			h->pnext = vm->pollers;
			if (vm->pollers)
				vm->pollers->pprev = &h->pnext;
			vm->pollers = h;
			h->pprev = &vm->pollers;
		} else {
			fuse_pollhandle_destroy(ph);
		}
	}
	fuse_reply_poll(req, revents);
}

static void file_release(struct fh *f)
{
	struct handle *h = container_of(f, struct handle, fh);

	poller_unlink(h);
	free(h->snap);
	free(h->wbuf);
	free(h);
}

static const struct fh_ops file_ops = {
	.read = file_read,
	.write = file_write,
	.poll = file_poll,
	.release = file_release,
};

/* Regular files: each kind of handle does its own I/O (fh.h). */
static void fs_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
		    struct fuse_file_info *fi)
{
	big_lock();
	fh_of(fi)->ops->read(fh_of(fi), req, size, off, fi);
	big_unlock();
}

static void fs_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
		     struct fuse_file_info *fi)
{
	big_lock();
	fh_of(fi)->ops->write(fh_of(fi), req, buf, size, off, fi);
	big_unlock();
}

static void fs_poll(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi,
		    struct fuse_pollhandle *ph)
{
	big_lock();
	fh_of(fi)->ops->poll(fh_of(fi), req, fi, ph);
	big_unlock();
}

static void fs_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	big_lock();
	fh_release(fh_of(fi));
	big_unlock();
	fuse_reply_err(req, 0);
}

static void fs_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	fuse_reply_err(req, 0);
}

static void fs_statfs(fuse_req_t req, fuse_ino_t ino)
{
	struct statvfs st = { .f_bsize = 4096, .f_frsize = 4096, .f_namemax = VM_NAME_MAX };

	fuse_reply_statfs(req, &st);
}

const struct fuse_lowlevel_ops fs_ops = {
	.lookup = fs_lookup,
	.forget = fs_forget,
	.forget_multi = fs_forget_multi,
	.getattr = fs_getattr,
	.setattr = fs_setattr,
	.access = fs_access,
	.mkdir = fs_mkdir,
	.rmdir = fs_rmdir,
	.mknod = fs_mknod,
	.create = fs_create,
	.unlink = fs_unlink,
	.symlink = fs_symlink,
	.link = fs_link,
	.rename = fs_rename,
	.opendir = fs_opendir,
	.readdir = fs_readdir,
	.releasedir = fs_releasedir,
	.open = fs_open,
	.read = fs_read,
	.write = fs_write,
	.poll = fs_poll,
	.release = fs_release,
	.flush = fs_flush,
	.statfs = fs_statfs,
};
