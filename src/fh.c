/* The list of open file handles; see fh.h. */
#include "config.h"

#include <stddef.h>

#include "fh.h"

static struct fh *open_handles;

void fh_track(struct fh *f, const struct fh_ops *ops)
{
	f->ops = ops;
	f->next = open_handles;
	if (open_handles)
		open_handles->pprev = &f->next;
	open_handles = f;
	f->pprev = &open_handles;
}

void fh_untrack(struct fh *f)
{
	if (!f->pprev)
		return;
	*f->pprev = f->next;
	if (f->next)
		f->next->pprev = f->pprev;
	f->next = NULL;
	f->pprev = NULL;
}

void fh_release(struct fh *f)
{
	fh_untrack(f);
	f->ops->release(f);
}

void fh_release_all(void)
{
	while (open_handles)
		fh_release(open_handles);
}
