#include "config.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>

#include "log.h"
#include "loop.h"
#include "pending.h"

static pthread_mutex_t table_mutex = PTHREAD_MUTEX_INITIALIZER;
static struct pending *table; /* every parked request */
static struct loop *loop;

void pending_init(struct loop *l)
{
	loop = l;
}

static void plist_unlink(struct pending *p)
{
	struct plist *l = p->list;

	if (!l)
		return;
	if (p->qprev)
		p->qprev->qnext = p->qnext;
	else
		l->head = p->qnext;
	if (p->qnext)
		p->qnext->qprev = p->qprev;
	else
		l->tail = p->qprev;
	p->list = NULL;
	p->qprev = p->qnext = NULL;
}

/* Loop thread, big lock held: answer the interrupted ones. */
static void pending_reap_interrupted(void *arg)
{
	struct pending *p;

	(void)arg;
	for (;;) {
		pthread_mutex_lock(&table_mutex);
		for (p = table; p && !p->interrupted; p = p->gnext)
			;
		pthread_mutex_unlock(&table_mutex);
		if (!p)
			return;
		if (p->cancel)
			p->cancel(p);
		fuse_reply_err(pending_take(p), EINTR);
	}
}

static void pending_interrupt(fuse_req_t req, void *data)
{
	struct pending *p;

	(void)data; /* never dereferenced unless still in the table */
	pthread_mutex_lock(&table_mutex);
	for (p = table; p; p = p->gnext) {
		if (p->req == req) {
			p->interrupted = true;
			loop_call(loop, pending_reap_interrupted, NULL);
			break;
		}
	}
	pthread_mutex_unlock(&table_mutex);
}

struct pending *pending_park(fuse_req_t req, struct plist *list, int kind, size_t size,
			     void *handle)
{
	return pending_park_cancel(req, list, kind, size, handle, NULL);
}

struct pending *pending_park_cancel(fuse_req_t req, struct plist *list, int kind, size_t size,
				    void *handle, void (*cancel)(struct pending *p))
{
	struct pending *p = calloc(1, sizeof(*p));

	if (!p)
		return NULL;
	p->cancel = cancel;
	p->req = req;
	p->kind = kind;
	p->size = size;
	p->handle = handle;
	p->list = list;
	p->qprev = list->tail;
	if (list->tail)
		list->tail->qnext = p;
	else
		list->head = p;
	list->tail = p;
	pthread_mutex_lock(&table_mutex);
	p->gnext = table;
	if (table)
		table->gprev = p;
	table = p;
	pthread_mutex_unlock(&table_mutex);
	/* may call pending_interrupt at once if already interrupted */
	fuse_req_interrupt_func(req, pending_interrupt, p);
	return p;
}

fuse_req_t pending_take(struct pending *p)
{
	fuse_req_t req = p->req;

	plist_unlink(p);
	pthread_mutex_lock(&table_mutex);
	if (p->gprev)
		p->gprev->gnext = p->gnext;
	else
		table = p->gnext;
	if (p->gnext)
		p->gnext->gprev = p->gprev;
	pthread_mutex_unlock(&table_mutex);
	free(p);
	return req;
}

void plist_fail_all(struct plist *list, int err)
{
	while (list->head)
		fuse_reply_err(pending_take(list->head), err);
}
