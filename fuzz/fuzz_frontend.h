/* In-process stand-in for QEMU, shared by the device harnesses: a device on
 * a loop that the harness drives itself (loop_run_once, no thread, so every
 * run is deterministic), a vhost-user connection to it, memfd guest RAM. */
#ifndef CAPSAFS_FUZZ_FRONTEND_H
#define CAPSAFS_FUZZ_FRONTEND_H

#include <stdbool.h>
#include <stdint.h>

#include "loop.h"
#include "vsock/vhost_user.h"
#include "vsock/vsock.h"

#define FE_GPA_BASE 0x40000000ull
#define FE_RAM_SIZE (2u << 20) /* two regions of 1 MiB, adjacent in gpa */
#define FE_GUEST_CID 3

struct fe {
	struct loop *loop;
	struct vsock_dev *dev;
	char path[108];
	int sock;       /* our end of the vhost-user connection, -1 once dropped */
	int memfd;
	uint8_t *ram;   /* our mapping of guest RAM; its address is the "uva" */
	int kick[2], call[2]; /* eventfds we hand over for rx (0) and tx (1) */
};

/* Once per process: loop, guest RAM, eventfds. */
void fe_global_init(struct fe *fe);
/* Per run: a fresh device (accept callback as given) and a connection. */
void fe_start(struct fe *fe, vsock_accept_fn accept, void *arg);
/* Per run: drop the connection, free the device, let the loop settle. */
void fe_stop(struct fe *fe);
/* The lowest free file descriptor; fe_check_fds aborts when it moved since
 * (a descriptor leaked during the run). */
int fe_lowest_free_fd(void);
void fe_check_fds(int lowest);
/* Let the device handle whatever is pending; drain its replies. */
void fe_pump(struct fe *fe);
/* One vhost-user message (raw bytes after a header); false once the device
 * has dropped us. */
bool fe_send_raw(struct fe *fe, const void *buf, size_t len, const int *fds, unsigned nfds);
bool fe_msg(struct fe *fe, uint32_t req, uint32_t flags, const void *payload, uint32_t size,
	    const int *fds, unsigned nfds);
/* The usual QEMU sequence: features, memory table (both regions), both rings
 * at the given addresses (uva = ram + offset) and size, enabled. */
void fe_setup(struct fe *fe, uint64_t features, unsigned num, const uint64_t ring_off[2][3]);
/* Kick ring idx through its eventfd and let the loop run. */
void fe_kick(struct fe *fe, unsigned idx);

#endif
