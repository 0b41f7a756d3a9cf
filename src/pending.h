/* FUSE requests parked until the loop can answer them (a blocking read of the
 * console or a vsock node, a ctl write that waits for QEMU).  Each parked
 * request can be interrupted (Ctrl-C): the interrupt is noted under a small
 * mutex and answered with EINTR from the loop thread, so an interrupt never
 * races a normal reply. */
#ifndef CAPSAFS_PENDING_H
#define CAPSAFS_PENDING_H

#include <fuse_lowlevel.h>
#include <stdbool.h>

struct loop;
struct pending;

struct plist {
	struct pending *head, *tail;
};

struct pending {
	fuse_req_t req;
	size_t size;  /* bytes asked for (read) or written (write) */
	void *handle; /* the open file it belongs to, if any */
	int kind;     /* owner-defined */
	struct plist *list;
	struct pending *qprev, *qnext; /* in list */
	struct pending *gprev, *gnext; /* in the global table */
	bool interrupted;
	/* on interrupt, before the EINTR reply (big lock held): undo side effects */
	void (*cancel)(struct pending *p);
};

void pending_init(struct loop *l);

/* Park req on list (big lock held). */
struct pending *pending_park(fuse_req_t req, struct plist *list, int kind, size_t size,
			     void *handle);
/* Same, with a hook run if the request is interrupted. */
struct pending *pending_park_cancel(fuse_req_t req, struct plist *list, int kind, size_t size,
				    void *handle, void (*cancel)(struct pending *p));
/* Unpark: returns the request to answer (exactly once); frees p. */
fuse_req_t pending_take(struct pending *p);

static inline bool plist_empty(const struct plist *l)
{
	return l->head == NULL;
}

/* Answer every request on list with errno err. */
void plist_fail_all(struct plist *list, int err);

#endif
