/* Arbitrary vhost-user traffic from the frontend (QEMU's side of the
 * socket): message headers, sizes that disagree with what is sent, messages
 * split across writes, any number of file descriptors of any kind attached
 * to any message, and guest memory contents the messages point the rings at.
 * The device runs in-process on a loop this thread drives (fuzz_frontend.c).
 *
 * Input: records, each [ctl u8] then
 *   ctl & 0x80: poke guest RAM: [off u16][n u8][n bytes]
 *   otherwise a message: nfds = (ctl & 15) % 10, kinds [u16] (2 bits each:
 *   memfd, kick eventfd, call eventfd, pipe), then
 *     ctl & 0x10 (raw):  [request u32][flags u32][size u32][n u16][n bytes]
 *     else:              [request u8][flags u8][n u16 % 300][n bytes], size = n
 *   ctl & 0x20: the bytes go out in two writes (split at [u8]), fds with the
 *   first; ctl & 0x40: both rings are kicked afterwards.
 *
 * Checked: sanitizers; no file descriptor survives the device; the device
 * never stalls the loop (a reply it cannot send is dropped within its own
 * timeout). */
#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fuzz_frontend.h"
#include "fuzz_input.h"

static struct fe fe;
static int pipefd[2];

static int accept_none(void *arg, struct vsock_conn *c, uint32_t hp, uint32_t gp)
{
	return -1; /* refuse: this harness is about the control channel */
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static bool init;
	struct fin f = { data, size };
	int lowest;
	unsigned records = 0;

	if (!init) {
		init = true;
		fe_global_init(&fe);
		if (pipe(pipefd) < 0)
			abort();
	}
	lowest = fe_lowest_free_fd();
	memset(fe.ram, 0, 65536 + 256);
	fe_start(&fe, accept_none, NULL);

	while (fin_left(&f) && fe.sock >= 0 && records++ < 256) {
		uint8_t ctl = fin_u8(&f);
		uint8_t buf[VHOST_USER_HDR_SIZE + 4200];
		const uint8_t *p;
		size_t n, len;

		if (ctl & 0x80) {
			uint16_t off = fin_u16(&f);
			n = fin_take(&f, &p, fin_u8(&f));
			memcpy(fe.ram + off, p, n);
			continue;
		}
		unsigned nfds = (ctl & 15) % 10, i;
		uint16_t kinds = fin_u16(&f);
		int fds[10];
		for (i = 0; i < nfds; i++) {
			switch ((kinds >> (2 * (i % 8))) & 3) {
			case 0: fds[i] = fe.memfd; break;
			case 1: fds[i] = fe.kick[i & 1]; break;
			case 2: fds[i] = fe.call[i & 1]; break;
			default: fds[i] = pipefd[0]; break;
			}
		}
		if (ctl & 0x10) {
			struct vhost_user_hdr h;
			h.request = fin_u32(&f);
			h.flags = fin_u32(&f);
			h.size = fin_u32(&f);
			memcpy(buf, &h, sizeof(h));
			n = fin_take(&f, &p, fin_u16(&f) % 4200);
		} else {
			struct vhost_user_hdr h;
			h.request = fin_u8(&f);
			h.flags = fin_u8(&f);
			n = fin_take(&f, &p, fin_u16(&f) % 300);
			h.size = (uint32_t)n;
			memcpy(buf, &h, sizeof(h));
		}
		memcpy(buf + VHOST_USER_HDR_SIZE, p, n);
		len = VHOST_USER_HDR_SIZE + n;
		if (ctl & 0x20) {
			size_t cut = fin_u8(&f) % len;
			if (!fe_send_raw(&fe, buf, cut, fds, nfds))
				break;
			fe_pump(&fe);
			if (!fe_send_raw(&fe, buf + cut, len - cut, NULL, 0))
				break;
		} else if (!fe_send_raw(&fe, buf, len, fds, nfds)) {
			break;
		}
		fe_pump(&fe);
		if (ctl & 0x40) {
			fe_kick(&fe, 0);
			fe_kick(&fe, 1);
		}
	}
	fe_stop(&fe);

	fe_check_fds(lowest);
	return 0;
}
