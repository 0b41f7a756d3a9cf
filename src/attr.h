/* The table of a VM's files: name, mode, kind, and how a value is shown and
 * stored. */
#ifndef CAPSAFS_ATTR_H
#define CAPSAFS_ATTR_H

#include <stddef.h>
#include <sys/types.h>

struct vm;
struct cred;

enum attr_kind {
	ATTR_VALUE,   /* one value, parsed on write */
	ATTR_CTL,     /* commands */
	ATTR_STATE,   /* pollable value */
	ATTR_CONSOLE, /* stream: history, then follows */
	ATTR_LOG,     /* snapshot of the console */
};

struct attr_def {
	const char *name;
	mode_t mode;
	enum attr_kind kind;
	/* Print the value (with its newline) into buf; returns its length. */
	size_t (*show)(struct vm *vm, char *buf, size_t len);
	/* Parse and apply; 0 or -errno with a sentence in vm->error. */
	int (*store)(struct vm *vm, const char *val, size_t len, const struct cred *who);
};

extern const struct attr_def attr_table[];
extern const size_t attr_count;

int attr_find(const char *name); /* index or -1 */

#define ATTR_VALUE_MAX 4096 /* longest value a write may carry */

#endif
