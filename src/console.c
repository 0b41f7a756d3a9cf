#include "config.h"

#include <stdlib.h>
#include <string.h>

#include "console.h"
#include "util.h"

int console_init(struct console *c, size_t size)
{
	memset(c, 0, sizeof(*c));
	c->buf = malloc(size);
	if (!c->buf)
		return -ENOMEM;
	c->size = size;
	return 0;
}

void console_fini(struct console *c)
{
	free(c->buf);
	c->buf = NULL;
}

void console_append(struct console *c, const char *data, size_t len)
{
	if (len > c->size) { /* only the tail can be kept */
		c->total += len - c->size;
		data += len - c->size;
		len = c->size;
	}
	while (len > 0) {
		size_t pos = (size_t)(c->total % c->size);
		size_t n = MIN(len, c->size - pos);
		memcpy(c->buf + pos, data, n);
		c->total += n;
		data += n;
		len -= n;
	}
}

void console_boot(struct console *c)
{
	c->boot_start = c->total;
}

uint64_t console_first(const struct console *c)
{
	uint64_t oldest = c->total > c->size ? c->total - c->size : 0;

	return MAX(c->boot_start, oldest);
}

size_t console_read(const struct console *c, uint64_t *off, char *dst, size_t len)
{
	uint64_t oldest = c->total > c->size ? c->total - c->size : 0;
	size_t done = 0;

	if (*off < oldest)
		*off = oldest;
	if (*off > c->total)
		*off = c->total;
	while (done < len && *off < c->total) {
		size_t pos = (size_t)(*off % c->size);
		size_t n = MIN(len - done, c->size - pos);
		n = MIN(n, (size_t)(c->total - *off));
		memcpy(dst + done, c->buf + pos, n);
		done += n;
		*off += n;
	}
	return done;
}
