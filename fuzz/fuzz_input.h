/* A cursor over a fuzzer input: takes integers and byte runs from the front;
 * past the end everything reads as zero, so every harness decodes any input. */
#ifndef CAPSAFS_FUZZ_INPUT_H
#define CAPSAFS_FUZZ_INPUT_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

struct fin {
	const uint8_t *p;
	size_t n;
};

static inline size_t fin_left(const struct fin *f) { return f->n; }

static inline void fin_bytes(struct fin *f, void *out, size_t len)
{
	size_t k = len < f->n ? len : f->n;

	memcpy(out, f->p, k);
	memset((uint8_t *)out + k, 0, len - k);
	f->p += k;
	f->n -= k;
}

/* Up to len bytes without copying; returns how many. */
static inline size_t fin_take(struct fin *f, const uint8_t **out, size_t len)
{
	size_t k = len < f->n ? len : f->n;

	*out = f->p;
	f->p += k;
	f->n -= k;
	return k;
}

#define FIN_INT(bits)                                                           \
	static inline uint##bits##_t fin_u##bits(struct fin *f)                 \
	{                                                                       \
		uint##bits##_t v;                                               \
		fin_bytes(f, &v, sizeof(v));                                    \
		return v;                                                       \
	}
FIN_INT(8)
FIN_INT(16)
FIN_INT(32)
FIN_INT(64)
#undef FIN_INT

#endif
