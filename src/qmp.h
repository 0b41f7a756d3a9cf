/* QMP, QEMU's JSON control channel: just what capsafs needs — the capability
 * handshake, a few commands, and events spotted by name. */
#ifndef CAPSAFS_QMP_H
#define CAPSAFS_QMP_H

#include <stddef.h>

struct loop;
struct qmp;

struct qmp_ops {
	void (*ready)(void *arg);                       /* handshake done */
	void (*event)(void *arg, const char *name);     /* e.g. "SHUTDOWN" */
	void (*hangup)(void *arg);                      /* QEMU closed it */
};

struct qmp *qmp_new(struct loop *l, int fd, const struct qmp_ops *ops, void *arg);
void qmp_free(struct qmp *q);
int qmp_execute(struct qmp *q, const char *command);

/* Pure helper (unit-tested): the event name of one QMP line, or NULL.
 * Writes at most len bytes into name. */
const char *qmp_event_name(const char *line, char *name, size_t len);

#endif
