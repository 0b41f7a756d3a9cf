/* A test "guest": plays QEMU's part of vhost-user (memfd guest RAM, the same
 * message sequence, fds over SCM_RIGHTS) and a guest virtio driver's part of
 * the split rings (posts rx buffers, sends tx chains in several layouts,
 * reads used rings).  Used by the vsock C tests and the bench; it talks to
 * the device only through its socket, never through its internals. */
#ifndef CAPSAFS_TESTS_VSOCK_DRIVER_H
#define CAPSAFS_TESTS_VSOCK_DRIVER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <linux/virtio_ring.h>
#include <linux/virtio_vsock.h>

#define VD_HDR ((uint32_t)sizeof(struct virtio_vsock_hdr))
#define VD_GPA_BASE 0x40000000ull /* guest-physical base: never equals an offset or uva */

/* How a tx packet is laid out in descriptors. */
enum vd_layout {
	VD_HDR_PAYLOAD, /* header descriptor + payload descriptor (classic Linux) */
	VD_ONE,         /* header and payload in one descriptor (Linux 6.1-6.3) */
	VD_SPLIT_HDR,   /* header split over two descriptors, then payload */
	VD_SCATTER,     /* header, then payload over many small descriptors */
	VD_INDIRECT,    /* header + payload through an indirect table */
	VD_STRADDLE,    /* one descriptor crossing the two memory regions */
};

struct vd_opts {
	unsigned qsize;        /* default 128 */
	bool event_idx;        /* negotiate VIRTIO_RING_F_EVENT_IDX */
	bool indirect;         /* negotiate VIRTIO_RING_F_INDIRECT_DESC */
	unsigned rx_buf_size;  /* bytes per rx buffer incl. header, default 4096 */
	bool rx_split;         /* rx buffers as 2 descriptors, split inside the header */
	bool reply_ack;        /* negotiate REPLY_ACK and ask for acks */
};

struct vd_pkt {
	struct virtio_vsock_hdr hdr;
	uint32_t len; /* payload bytes in data */
	uint8_t *data;
};

struct vd_ring {
	unsigned num;
	struct vring_desc *desc;
	struct vring_avail *avail;
	struct vring_used *used;
	uint16_t avail_idx, last_used;
	int kickfd, callfd;
	uint16_t free_head;
	unsigned nfree;
	uint16_t *chain;       /* per head: descriptor count of its chain */
	uint16_t (*chain_ids)[64]; /* per head: the descriptors it used */
	uint64_t slot_gpa;     /* per-head buffer slots */
	uint32_t slot_size;
};

struct vd {
	int sock;
	int memfd;
	uint8_t *ram;
	uint64_t ram_size, half;
	uint64_t features, protocol_features;
	struct vd_opts o;
	struct vd_ring rx, tx;
	uint64_t scratch_gpa; /* free area for hand-made malformed chains */
	uint64_t cid;
	/* received packets, in order */
	struct vd_pkt *q;
	unsigned qhead, qlen, qcap;
	uint64_t rx_count, tx_count;
};

int vd_open(struct vd *v, const char *sock_path, const struct vd_opts *o);
/* Close the frontend connection (like QEMU exiting); frees everything. */
void vd_close(struct vd *v);

void *vd_gpa(struct vd *v, uint64_t gpa, uint64_t len);

/* Post every free rx descriptor as a buffer; kicks. */
void vd_post_rx(struct vd *v);
/* Send one packet (payload may be NULL/0).  Waits for tx descriptors if the
 * ring is full (up to ~2 s, then returns -ETIMEDOUT). */
int vd_send(struct vd *v, const struct virtio_vsock_hdr *h, const void *payload, uint32_t len,
	    enum vd_layout layout);
/* Build a header from guest cid to host. */
void vd_hdr(struct vd *v, struct virtio_vsock_hdr *h, uint32_t src_port, uint32_t dst_port,
	    uint16_t op, uint32_t len, uint32_t buf_alloc, uint32_t fwd_cnt);

/* Raw chain for malformed-input tests: takes n descriptors from the free
 * list (their indices in ids[]), lets the caller fill them, then posts ids[0]. */
int vd_raw_alloc(struct vd *v, unsigned n, uint16_t *ids);
void vd_raw_post(struct vd *v, uint16_t head);

/* Reap used rings, queue received packets, repost rx buffers.  Waits up to
 * timeout_ms for something to happen.  Returns the number of packets queued. */
int vd_poll(struct vd *v, int timeout_ms);
/* Next received packet (caller frees pkt->data); waits up to timeout_ms. */
int vd_recv(struct vd *v, struct vd_pkt *pkt, int timeout_ms);
/* Tx chains not yet returned by the device. */
unsigned vd_tx_inflight(const struct vd *v);

/* A raw vhost-user request; returns the reply payload size or -errno. */
int vd_msg(struct vd *v, uint32_t req, uint32_t flags, const void *payload, uint32_t size,
	   const int *fds, unsigned nfds, void *reply, uint32_t reply_size);
int vd_get_config_cid(struct vd *v, uint64_t *cid);

#endif
