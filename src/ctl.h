/* Table-driven parsing of text commands written to ctl files (Plan 9 style):
 * a verb, then whitespace-separated arguments. */
#ifndef CAPSAFS_CTL_H
#define CAPSAFS_CTL_H

#include <stddef.h>

#define CTL_MAX_ARGS 8

struct ctl_cmd {
	const char *verb;
	int min_args, max_args; /* not counting the verb */
	int (*run)(void *obj, int argc, char **argv, void *ctx);
};

/* Split buf (one command, optional trailing newline) and run the matching
 * table entry.  Returns the handler's result, -EINVAL for an empty command,
 * an unknown verb or a wrong argument count (with a sentence in err). */
int ctl_run(const struct ctl_cmd *table, size_t n, const char *buf, size_t len, void *obj,
	    void *ctx, char *err, size_t errlen);

#endif
