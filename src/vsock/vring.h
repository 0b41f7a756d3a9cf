/* Split virtqueues, device side.  The guest writes the descriptor table and
 * the avail ring at any moment, so every index, address and length read from
 * them is checked before use and read exactly once. */
#ifndef CAPSAFS_VSOCK_VRING_H
#define CAPSAFS_VSOCK_VRING_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/uio.h>
#include <linux/virtio_ring.h>

#include "vsock/memory.h"

#define VRING_MAX_NUM 32768u
/* Descriptors one chain may have (direct + indirect): a longer chain is a
 * loop or an attack, and it bounds the work per packet. */
#define VRING_MAX_CHAIN 1024u
/* iovecs one chain may produce (a descriptor may straddle regions). */
#define VRING_MAX_IOV 1024u

struct vring_chain {
	uint16_t head;
	unsigned nout, nin;    /* device-readable iovecs first, then writable */
	size_t out_len, in_len;
	struct iovec *iov;     /* caller's pool: iov[0..nout) out, [nout..nout+nin) in */
};

struct vq {
	unsigned num;          /* 0 = not configured */
	uint64_t desc_uva, avail_uva, used_uva;
	bool addr_set;
	bool enabled;          /* SET_VRING_ENABLE, or implied without protocol features */
	bool started;          /* kick fd received, not stopped by GET_VRING_BASE */
	bool broken;           /* the guest corrupted the ring: ignore until reconfigured */
	bool event_idx, indirect;
	bool used_synced;      /* used_idx read back from the ring after SET_VRING_ADDR */
	struct vring_desc *desc;
	struct vring_avail *avail;
	struct vring_used *used;
	uint16_t last_avail;   /* next avail entry we consume */
	uint16_t used_idx;     /* our copy of used->idx */
	uint16_t signalled_used;
	bool signalled_valid;
	bool pending_signal;   /* pushed since the last interrupt decision */
	int kickfd, callfd, errfd;
	struct loop_watch *kick_watch;
	uint64_t bad_chains;
	void *owner;    /* the device, for the kick callback */
	unsigned index;
};

void vq_init(struct vq *vr);
/* Forget the configuration (closes fds; caller removes kick_watch first). */
void vq_reset(struct vq *vr);
/* Translate the ring areas through the current memory table. */
int vq_map(struct vq *vr, const struct vu_mem *m);
bool vq_ready(const struct vq *vr);

/* Take the next available chain.  Returns 1 with *ch filled; 0 when the ring
 * is empty; -EINVAL when the chain was malformed (it has been returned to the
 * guest with length 0 — the guest loses that buffer's packet, nothing else);
 * -ENOSPC when the chain needs more than max iovecs (it stays available);
 * -EIO when the ring itself is corrupt (it is marked broken). */
int vq_pop(struct vq *vr, const struct vu_mem *m, struct vring_chain *ch,
	      struct iovec *iov, unsigned max);
/* Give back the last n popped chains that were not pushed. */
void vq_unpop(struct vq *vr, unsigned n);
void vq_push(struct vq *vr, uint16_t head, uint32_t len);
/* Interrupt the guest if it wants one for what was pushed (EVENT_IDX or
 * VRING_AVAIL_F_NO_INTERRUPT). */
void vq_notify(struct vq *vr);
/* True if no chain is available; with EVENT_IDX it first asks the guest to
 * kick on its next addition and re-checks, closing the race. */
bool vq_empty_arm(struct vq *vr);
bool vq_has_avail(const struct vq *vr);

/* Copy helpers between flat buffers and iovec arrays, from byte offset off. */
size_t iov_to_buf(const struct iovec *iov, unsigned n, size_t off, void *buf, size_t len);
size_t iov_from_buf(const struct iovec *iov, unsigned n, size_t off, const void *buf,
		    size_t len);
/* Sub-array of iov covering [off, off+len); returns the count (<= max). */
unsigned iov_slice(const struct iovec *iov, unsigned n, size_t off, size_t len,
		   struct iovec *out, unsigned max);

#endif
