/* Logging: one macro family that carries file:line:function. */
#ifndef CAPSAFS_LOG_H
#define CAPSAFS_LOG_H

#include <stdarg.h>

enum log_level { LOG_ERR, LOG_WARN, LOG_INFO, LOG_DEBUG };

extern int log_verbosity; /* messages above this level are dropped */

void log_msg(enum log_level lvl, const char *file, int line, const char *func,
	     const char *fmt, ...) __attribute__((format(printf, 5, 6)));

#define log_err(...) log_msg(LOG_ERR, __FILE__, __LINE__, __func__, __VA_ARGS__)
#define log_warn(...) log_msg(LOG_WARN, __FILE__, __LINE__, __func__, __VA_ARGS__)
#define log_info(...) log_msg(LOG_INFO, __FILE__, __LINE__, __func__, __VA_ARGS__)
#define log_debug(...) log_msg(LOG_DEBUG, __FILE__, __LINE__, __func__, __VA_ARGS__)

#endif
