/* A VM's console history: a bounded ring addressed by absolute byte offsets
 * (bytes since the VM object was made), so readers can follow it like tail -f
 * across boots. */
#ifndef CAPSAFS_CONSOLE_H
#define CAPSAFS_CONSOLE_H

#include <stddef.h>
#include <stdint.h>

#define CONSOLE_RING_SIZE (1u << 20) /* 1 MiB, documented in capsafs(1) */

struct console {
	char *buf;
	size_t size;
	uint64_t total;      /* bytes ever appended */
	uint64_t boot_start; /* offset where the current/last boot began */
};

int console_init(struct console *c, size_t size);
void console_fini(struct console *c);
void console_append(struct console *c, const char *data, size_t len);
/* Mark the start of a new boot: readers opened later start here. */
void console_boot(struct console *c);
/* Where a new reader starts: the boot start, or the oldest byte still kept. */
uint64_t console_first(const struct console *c);
/* Copy up to len bytes starting at *off (moved forward past bytes that were
 * overwritten). Returns bytes copied (0 when *off == total). */
size_t console_read(const struct console *c, uint64_t *off, char *dst, size_t len);

#endif
