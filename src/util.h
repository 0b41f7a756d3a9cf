/* Small helpers shared by every file: cleanup attributes, ownership hand-over,
 * strict number parsing. */
#ifndef CAPSAFS_UTIL_H
#define CAPSAFS_UTIL_H

#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))
#define container_of(ptr, type, member) ((type *)((char *)(ptr) - offsetof(type, member)))

static inline void free_ptr(void *p) { free(*(void **)p); }
static inline void close_fd(int *fd)
{
	if (*fd >= 0) {
		int saved = errno;
		close(*fd);
		errno = saved;
	}
}
static inline void fclose_file(FILE **f)
{
	if (*f)
		fclose(*f);
}

#define __do_free __attribute__((cleanup(free_ptr)))
#define __do_close __attribute__((cleanup(close_fd)))
#define __do_fclose __attribute__((cleanup(fclose_file)))

/* Take ownership out of a cleanup variable. */
#define move_ptr(p) ({ typeof(p) __p = (p); (p) = NULL; __p; })
#define move_fd(fd) ({ int __fd = (fd); (fd) = -1; __fd; })

/* Strict parsing of one unsigned decimal number that may be followed by a
 * single newline.  Returns 0, -EINVAL for syntax, -ERANGE outside [min, max]. */
int parse_u64(const char *s, size_t len, uint64_t min, uint64_t max, uint64_t *out);

/* Copy of s[0..len) without one trailing newline; NULL on a NUL byte inside or
 * a newline that is not the last byte (errno EINVAL) or on ENOMEM. */
char *dup_value(const char *s, size_t len);

/* Write all of buf, retrying on EINTR/short writes; MSG_NOSIGNAL for sockets
 * is the caller's business. */
int write_all(int fd, const void *buf, size_t len);

/* mkdir -p with mode for each created level. */
int mkdir_p(const char *path, mode_t mode);

uint64_t now_ms(void);

/* Bytes malloc has handed out and not had back: glibc's arenas and mmapped
 * blocks, or ASan's allocator in a sanitizer build. */
size_t heap_in_use(void);

#endif
