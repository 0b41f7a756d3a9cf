#include "config.h"

#include <fcntl.h>
#include <fuse_lowlevel.h>
#include <grp.h>
#include <string.h>
#include <sys/fsuid.h>
#include <sys/stat.h>
#include <sys/syscall.h>

#include "cred.h"
#include "util.h"

void cred_from_req(struct fuse_req *req, struct cred *c)
{
	const struct fuse_ctx *ctx = fuse_req_ctx(req);
	int n;

	c->uid = ctx->uid;
	c->gid = ctx->gid;
	n = fuse_req_getgroups(req, CRED_MAX_GROUPS, c->groups);
	c->ngroups = n < 0 ? 0 : MIN(n, CRED_MAX_GROUPS);
}

void cred_self(struct cred *c)
{
	int n;

	c->uid = geteuid();
	c->gid = getegid();
	n = getgroups(CRED_MAX_GROUPS, c->groups);
	c->ngroups = n < 0 ? 0 : n;
}

bool cred_in_group(const struct cred *c, gid_t gid)
{
	int i;

	if (c->gid == gid)
		return true;
	for (i = 0; i < c->ngroups; i++)
		if (c->groups[i] == gid)
			return true;
	return false;
}

/* Permission to read path as c, judged from the mode bits of the file and of
 * every directory on the way (for a daemon that cannot switch identity). */
static int check_by_mode(const struct cred *c, const char *path)
{
	char buf[4096];
	size_t len = strlen(path), i;
	struct stat st;

	if (len >= sizeof(buf))
		return -ENAMETOOLONG;
	memcpy(buf, path, len + 1);
	for (i = 1; i <= len; i++) {
		mode_t need;
		if (buf[i] != '/' && buf[i] != '\0')
			continue;
		buf[i] = '\0';
		if (stat(buf, &st) < 0)
			return -errno;
		need = i == len ? 4 : 1; /* r for the file, x for directories */
		if (c->uid != 0) {
			mode_t bits = c->uid == st.st_uid ? (st.st_mode >> 6)
				      : cred_in_group(c, st.st_gid) ? (st.st_mode >> 3)
								     : st.st_mode;
			if (!(bits & need))
				return -EACCES;
		}
		if (i < len)
			buf[i] = '/';
	}
	return 0;
}

int cred_enter(const struct cred *c, struct cred_saved *s)
{
	s->switched = false;
	if (c->uid == geteuid())
		return 0;
	if (geteuid() != 0)
		return -EACCES;
	s->ngroups = getgroups(CRED_MAX_GROUPS, s->groups);
	if (s->ngroups < 0)
		s->ngroups = 0;
	if (syscall(SYS_setgroups, (size_t)c->ngroups, c->groups) < 0)
		return -errno;
	setfsgid(c->gid);
	setfsuid(c->uid);
	s->switched = true;
	return 0;
}

void cred_leave(struct cred_saved *s)
{
	if (!s->switched)
		return;
	setfsuid(0);
	setfsgid(0);
	syscall(SYS_setgroups, (size_t)s->ngroups, s->groups);
	s->switched = false;
}

/* Kernels and initramfs images are regular files: a FIFO, a device or a
 * directory named as one would hang or confuse QEMU. */
static int check_regular(int fd)
{
	struct stat st;

	if (fstat(fd, &st) < 0)
		return -errno;
	return S_ISREG(st.st_mode) ? 0 : -EINVAL;
}

/* O_NONBLOCK: a FIFO (or a tty) named as a kernel must not block the open,
 * which runs under the big lock; regular files ignore the flag. */
int cred_open_read(const struct cred *c, const char *path)
{
	int fd, err = 0;

	if (geteuid() == 0 && c->uid != 0) {
		/* Switch this thread's filesystem identity only: setfsuid/setfsgid
		 * are per thread, and the raw setgroups syscall is too (glibc's
		 * wrapper would change every thread). */
		gid_t saved_groups[CRED_MAX_GROUPS];
		int nsaved = getgroups(CRED_MAX_GROUPS, saved_groups);

		if (syscall(SYS_setgroups, (size_t)c->ngroups, c->groups) < 0)
			return -errno;
		setfsgid(c->gid);
		setfsuid(c->uid);
		fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
		if (fd < 0)
			err = -errno;
		else
			err = check_regular(fd);
		setfsuid(0);
		setfsgid(0);
		syscall(SYS_setgroups, (size_t)(nsaved < 0 ? 0 : nsaved), saved_groups);
		if (err && fd >= 0)
			close(fd);
		return err ? err : fd;
	}
	if (c->uid != geteuid() && geteuid() != 0) {
		err = check_by_mode(c, path);
		if (err)
			return err;
	}
	fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
	if (fd < 0)
		return -errno;
	err = check_regular(fd);
	if (err) {
		close(fd);
		return err;
	}
	return fd;
}
