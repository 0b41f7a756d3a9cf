/* QMP, QEMU's JSON control channel: just what capsafs needs — the capability
 * handshake, a few commands, and events spotted by name. */
#ifndef CAPSAFS_QMP_H
#define CAPSAFS_QMP_H

#include <stddef.h>

struct loop;
struct qmp;

struct qmp_ops {
	void (*ready)(void *arg);                       /* handshake done */
	/* e.g. "SHUTDOWN"; line is the whole message, for qmp_string_field */
	void (*event)(void *arg, const char *name, const char *line);
	void (*hangup)(void *arg);                      /* QEMU closed it */
};

struct qmp *qmp_new(struct loop *l, int fd, const struct qmp_ops *ops, void *arg);
void qmp_free(struct qmp *q);
int qmp_execute(struct qmp *q, const char *command);

/* Pure helper (unit-tested): the event name of one QMP line, or NULL.
 * Writes at most len bytes into name. */
const char *qmp_event_name(const char *line, char *name, size_t len);
/* The string value of "key" anywhere in a QMP line (first match), or NULL. */
const char *qmp_string_field(const char *line, const char *key, char *out, size_t len);

#endif
