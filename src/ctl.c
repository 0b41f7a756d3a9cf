#include "config.h"

#include <stdio.h>
#include <string.h>

#include "ctl.h"
#include "util.h"

int ctl_run(const struct ctl_cmd *table, size_t n, const char *buf, size_t len, void *obj,
	    void *ctx, char *err, size_t errlen)
{
	char line[1024], *argv[CTL_MAX_ARGS + 1], *p, *save = NULL;
	int argc = 0;
	size_t i;

	if (len > 0 && buf[len - 1] == '\n')
		len--;
	if (len >= sizeof(line)) {
		snprintf(err, errlen, "command too long (%zu bytes)", len);
		return -EINVAL;
	}
	if (memchr(buf, '\0', len) || memchr(buf, '\n', len)) {
		snprintf(err, errlen, "one command per write, without NUL bytes");
		return -EINVAL;
	}
	memcpy(line, buf, len);
	line[len] = '\0';
	for (p = strtok_r(line, " \t", &save); p; p = strtok_r(NULL, " \t", &save)) {
		if (argc == CTL_MAX_ARGS + 1) {
			snprintf(err, errlen, "too many arguments");
			return -EINVAL;
		}
		argv[argc++] = p;
	}
	if (argc == 0) {
		snprintf(err, errlen, "empty command");
		return -EINVAL;
	}
	for (i = 0; i < n; i++) {
		if (strcmp(table[i].verb, argv[0]) != 0)
			continue;
		if (argc - 1 < table[i].min_args || argc - 1 > table[i].max_args) {
			if (table[i].min_args == table[i].max_args)
				snprintf(err, errlen, "'%s' takes %d argument%s, got %d", argv[0],
					 table[i].min_args, table[i].min_args == 1 ? "" : "s",
					 argc - 1);
			else
				snprintf(err, errlen, "'%s' takes %d to %d arguments, got %d",
					 argv[0], table[i].min_args, table[i].max_args, argc - 1);
			return -EINVAL;
		}
		return table[i].run(obj, argc - 1, argv + 1, ctx);
	}
	snprintf(err, errlen, "unknown command '%.64s'", argv[0]);
	return -EINVAL;
}
