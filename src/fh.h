/* Open file handles (fi->fh).  Every handle starts with a struct fh: its ops
 * say what read, write, poll and release do for that kind of file, so fs.c
 * dispatches without looking at nodes, and every handle is on one list so
 * that the ones the kernel never released (a lazy unmount tears the channel
 * down with files still open) are freed at exit. */
#ifndef CAPSAFS_FH_H
#define CAPSAFS_FH_H

#include <fuse_lowlevel.h>
#include <stdint.h>

struct fh;

/* Each is called with the big lock held and answers req (now or later). */
struct fh_ops {
	void (*read)(struct fh *f, fuse_req_t req, size_t size, off_t off,
		     struct fuse_file_info *fi);
	void (*write)(struct fh *f, fuse_req_t req, const char *buf, size_t size, off_t off,
		      struct fuse_file_info *fi);
	void (*poll)(struct fh *f, fuse_req_t req, struct fuse_file_info *fi,
		     struct fuse_pollhandle *ph);
	/* frees the handle (no reply: release and exit share it) */
	void (*release)(struct fh *f);
};

struct fh {
	const struct fh_ops *ops;
	struct fh *next, **pprev;
};

/* Put f on the list of open handles (big lock held). */
void fh_track(struct fh *f, const struct fh_ops *ops);
/* Take f off the list; a handle not on it is left alone. */
void fh_untrack(struct fh *f);
/* Untrack and release. */
void fh_release(struct fh *f);
/* At exit, once no request can come: release every handle still open. */
void fh_release_all(void);

static inline struct fh *fh_of(const struct fuse_file_info *fi)
{
	return (struct fh *)(uintptr_t)fi->fh;
}

#endif
