/* The hybrid vsock socket's "CONNECT <port>\n" parser (hybrid_parse_line in
 * src/vsock_export.c), fed the way bridge_event feeds it: a client's bytes
 * arrive in arbitrary chunks, each recv bounded by the room left in the
 * 64-byte line buffer, and the parser runs after every recv.
 *
 * Input: [n][n bytes] chunks, repeated; the stream is their concatenation.
 * The outcome is checked against an independent reference of the grammar:
 * "CONNECT " decimal-port [\r] \n, port <= 4294967294, line within 64 bytes,
 * and whatever followed the newline stays in the buffer for the stream. */
#include "config.h"

#include <assert.h>
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "capsafs.h"
#include "vsock_host.h"
#include "fuzz_input.h"

struct capsafs cfs; /* main.c's, which is not linked */

#define CAP 64 /* HYBRID_LINE_MAX in vsock_export.c */

/* what the protocol says the first line of stream means */
static int reference(const uint8_t *s, size_t len, uint32_t *port, size_t *linelen)
{
	const uint8_t *nl = memchr(s, '\n', len < CAP ? len : CAP);
	size_t end, i;
	uint64_t v = 0;

	if (!nl)
		return len >= CAP ? -EINVAL : -EAGAIN;
	*linelen = (size_t)(nl - s);
	end = *linelen;
	if (end > 0 && s[end - 1] == '\r')
		end--;
	if (end <= 8 || memcmp(s, "CONNECT ", 8) != 0)
		return -EINVAL;
	for (i = 8; i < end; i++) {
		if (s[i] < '0' || s[i] > '9')
			return -EINVAL;
		v = v * 10 + (uint64_t)(s[i] - '0');
		if (v > 0xfffffffeu) {
			/* still all digits? then it is out of range: EINVAL too */
			return -EINVAL;
		}
	}
	*port = (uint32_t)v;
	return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct fin f = { data, size };
	uint8_t stream[4096];
	size_t slen = 0, chunks[512], nchunks = 0, pos = 0, k;
	char in[CAP];
	size_t inlen = 0;
	uint32_t port = 0, want_port = 0;
	size_t linelen = 0;
	int r = -EAGAIN, want;

	while (fin_left(&f) && nchunks < 512) {
		const uint8_t *p;
		size_t n = fin_take(&f, &p, fin_u8(&f) % 80);
		if (slen + n > sizeof(stream))
			break;
		memcpy(stream + slen, p, n);
		slen += n;
		chunks[nchunks++] = n;
	}
	want = reference(stream, slen, &want_port, &linelen);

	/* the client's writes arrive as chunks; a recv takes what fits */
	for (k = 0; k < nchunks && r == -EAGAIN; k++) {
		size_t left = chunks[k];
		while (left > 0 && r == -EAGAIN) {
			size_t n = left < CAP - inlen ? left : CAP - inlen;
			if (n == 0) /* full without a newline: the parser must have said so */
				abort();
			memcpy(in + inlen, stream + pos, n);
			inlen += n;
			pos += n;
			left -= n;
			r = hybrid_parse_line(in, sizeof(in), &inlen, &port);
		}
	}
	if (r != want) {
		fprintf(stderr, "hybrid_parse_line: %d, reference %d\n", r, want);
		abort();
	}
	if (r == 0) {
		if (port != want_port) {
			fprintf(stderr, "port %u, reference %u\n", port, want_port);
			abort();
		}
		/* the rest of what was received is stream data, in order */
		if (pos < linelen + 1 || inlen != pos - (linelen + 1) ||
		    memcmp(in, stream + linelen + 1, inlen) != 0)
			abort();
	}
	return 0;
}
