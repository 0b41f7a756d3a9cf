#include "config.h"

#include <stdio.h>
#include <string.h>

#include "log.h"

int log_verbosity = LOG_WARN;

void log_msg(enum log_level lvl, const char *file, int line, const char *func,
	     const char *fmt, ...)
{
	static const char *const names[] = { "error", "warning", "info", "debug" };
	char buf[1024];
	va_list ap;

	if ((int)lvl > log_verbosity)
		return;
	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	if (log_verbosity >= LOG_DEBUG)
		fprintf(stderr, "capsafs: %s: %s (%s:%d %s)\n", names[lvl], buf, file, line, func);
	else
		fprintf(stderr, "capsafs: %s: %s\n", names[lvl], buf);
}
