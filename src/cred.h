/* The credentials of a FUSE caller, and file access performed with them (so a
 * user cannot make the daemon read a file they could not read themselves). */
#ifndef CAPSAFS_CRED_H
#define CAPSAFS_CRED_H

#include <stdbool.h>
#include <sys/types.h>

#define CRED_MAX_GROUPS 64

struct cred {
	uid_t uid;
	gid_t gid;
	int ngroups;
	gid_t groups[CRED_MAX_GROUPS];
};

struct fuse_req;
void cred_from_req(struct fuse_req *req, struct cred *c);
void cred_self(struct cred *c);
bool cred_in_group(const struct cred *c, gid_t gid);

/* Act as c for the filesystem calls of this thread until cred_leave: the
 * per-thread fsuid/fsgid/groups of a root daemon.  Returns 0, or -EACCES
 * when the daemon cannot take c's identity (not root, and c is someone else). */
struct cred_saved {
	bool switched;
	int ngroups;
	gid_t groups[CRED_MAX_GROUPS];
};
int cred_enter(const struct cred *c, struct cred_saved *s);
void cred_leave(struct cred_saved *s);

/* open(path, O_RDONLY|O_CLOEXEC|O_NONBLOCK) as the user c: returns an fd or -errno. */
int cred_open_read(const struct cred *c, const char *path);

#endif
