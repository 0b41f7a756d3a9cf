/* Internals shared by the vsock device files: the device and connection
 * structures, and the entry points each file offers the others. */
#ifndef CAPSAFS_VSOCK_INT_H
#define CAPSAFS_VSOCK_INT_H

#include <stdbool.h>
#include <stdint.h>
#include <linux/virtio_vsock.h>

#include "vsock/memory.h"
#include "vsock/vring.h"
#include "vsock/vsock.h"

/* ---- intrusive doubly linked list; an unlinked node has next == NULL ---- */
struct list_node {
	struct list_node *prev, *next;
};
static inline void list_head_init(struct list_node *h) { h->prev = h->next = h; }
static inline bool list_empty(const struct list_node *h) { return h->next == h; }
static inline bool list_linked(const struct list_node *n) { return n->next != NULL; }
static inline void list_add_tail(struct list_node *h, struct list_node *n)
{
	n->prev = h->prev;
	n->next = h;
	h->prev->next = n;
	h->prev = n;
}
static inline void list_del(struct list_node *n)
{
	if (!n->next)
		return;
	n->prev->next = n->next;
	n->next->prev = n->prev;
	n->next = n->prev = NULL;
}

/* ---- tunables ---- */
#define VSOCK_SHUTDOWN_BOTH (VIRTIO_VSOCK_SHUTDOWN_RCV | VIRTIO_VSOCK_SHUTDOWN_SEND)
#define VSOCK_HDR_LEN ((uint32_t)sizeof(struct virtio_vsock_hdr)) /* 44 */
#define VSOCK_BUF_ALLOC (256u * 1024)  /* rx buffer we advertise per connection, at most */
#define VSOCK_BUF_MIN (4u * 1024)      /* ... and at least */
#define VSOCK_RX_BUDGET (32u << 20)    /* guest data one VM's connections may hold: see
					  conn_pick_buf_alloc */
#define VSOCK_TXBUF (64u * 1024)       /* host bytes queued beyond guest credit */
#define VSOCK_MAX_PKT (64u * 1024)     /* payload per packet, both ways */
#define VSOCK_CTRLQ 512u               /* queued connection-less replies (RST) */
#define VSOCK_CLOSE_TIMEOUT_MS 5000
#define VSOCK_CONNECT_TIMEOUT_MS 10000
#define VSOCK_EPHEMERAL_FIRST 49152u
#define VSOCK_SPLICE_CHAINS 64u        /* rx chains filled by one readv */

enum vsock_vq { VQ_RX = 0, VQ_TX = 1, VQ_COUNT = 2 };

enum conn_state {
	CONN_CONNECTING,  /* host sent REQUEST, waiting for RESPONSE */
	CONN_ESTABLISHED,
	CONN_PEER_CLOSED, /* guest closed both ways cleanly; host drains what is left */
	CONN_CLOSING,     /* host let go; delivering the rest, then SHUTDOWN, RST */
	CONN_DEAD,        /* reset; waiting for the host to call vsock_conn_close */
};

/* pending packets for one connection */
enum {
	PEND_REQUEST = 1u << 0,
	PEND_RESPONSE = 1u << 1,
	PEND_SHUTDOWN = 1u << 2, /* host_shut not yet fully sent */
	PEND_CREDIT = 1u << 3,
};

/* pending host callbacks */
enum {
	NOTE_ESTABLISHED = 1u << 0,
	NOTE_READABLE = 1u << 1,
	NOTE_WRITABLE = 1u << 2,
	NOTE_CLOSED = 1u << 3,
};

struct rx_chunk {
	struct rx_chunk *next;
	uint32_t len, cap, off; /* data[off..len) not yet read */
	uint8_t data[];
};

struct vsock_conn {
	struct vsock_dev *dev; /* NULL once the device is gone */
	uint32_t local_port, peer_port;
	enum conn_state state;
	int err; /* why CONN_DEAD */
	const struct vsock_conn_ops *ops;
	void *arg;

	struct vsock_conn *hnext; /* hash bucket chain */
	bool hashed;
	struct list_node all_node;    /* every conn of the device */
	struct list_node send_node;   /* has packets for the rx queue */
	struct list_node notify_node; /* has callbacks due */
	unsigned pend, notes;
	bool host_closed;   /* vsock_conn_close called: no more callbacks */
	bool want_writable; /* a write came up short: say writable when room opens */
	int in_cb;          /* callbacks running for this conn */
	bool free_pending;  /* vsock_conn_close ran inside a callback */

	/* guest -> host */
	uint32_t buf_alloc;    /* advertised to the guest; fixed for the connection's life */
	uint32_t reserved;     /* what c counts in dev->rx_reserved */
	struct rx_chunk *rx_head, *rx_tail;
	uint32_t rx_bytes;     /* buffered, unread */
	uint32_t rx_cnt;       /* total payload bytes received */
	uint32_t fwd_cnt;      /* total consumed by the host */
	uint32_t fwd_cnt_sent; /* fwd_cnt last told to the guest */
	uint32_t peer_shut;    /* guest's SHUTDOWN flags */

	/* host -> guest */
	uint32_t peer_buf_alloc, peer_fwd_cnt, tx_cnt;
	uint8_t *txbuf; /* ring of VSOCK_TXBUF bytes, allocated on first use */
	uint32_t tx_head, tx_len;
	uint32_t host_shut; /* SHUTDOWN flags the host asked for */
	uint32_t shut_sent; /* flags already sent to the guest */

	struct loop_timer *timer; /* connect or close timeout */
	uint32_t timer_tx_cnt;    /* progress marker for the close timeout */
};

struct vsock_ctrl_pkt {
	uint32_t src_port, dst_port; /* host port, guest port */
	uint16_t type, op;
};

struct vu_inbuf {
	uint8_t buf[12 + 4096];
	size_t have;
	int fds[VU_MEM_MAX_REGIONS];
	unsigned nfds;
};

struct vsock_dev {
	struct loop *loop;
	uint64_t guest_cid;
	char *socket_path;
	unsigned max_conns;
	vsock_accept_fn accept;
	void *accept_arg;
	unsigned close_timeout_ms, connect_timeout_ms;

	/* vhost-user */
	int listen_fd;
	struct loop_watch *listen_watch;
	int fd; /* frontend connection, -1 when none */
	struct loop_watch *watch;
	struct vu_inbuf in;
	uint64_t acked_features, protocol_features;
	struct vu_mem mem;
	struct vq vq[VQ_COUNT];
	struct iovec iov[VRING_MAX_IOV]; /* scratch for one chain */
	struct iovec siov[VRING_MAX_IOV]; /* scratch for splice gathers */

	/* connections */
	struct vsock_conn **buckets;
	unsigned nbuckets; /* power of two */
	unsigned nconns;   /* hashed */
	uint64_t rx_reserved; /* guest data its connections may hold: see conn_sync_reserve */
	struct list_node all, sendq, notifyq;
	struct vsock_ctrl_pkt ctrlq[VSOCK_CTRLQ];
	unsigned ctrl_head, ctrl_len;
	uint32_t next_port;
	struct loop_timer *notify_timer;

	int busy;   /* inside one of our loop callbacks */
	bool freed; /* vsock_dev_free ran while busy */

	struct {
		uint64_t rx_pkts, tx_pkts, dropped, rst_sent, ctrl_dropped;
	} stats;
};

/* vhost_user.c */
int vu_listen(struct vsock_dev *d);
void vu_disconnect(struct vsock_dev *d);
void vu_close_listener(struct vsock_dev *d);

/* device.c: called by vhost_user.c */
void dev_enter(struct vsock_dev *d);
/* Returns false if the device was freed meanwhile (d is gone). */
bool dev_leave(struct vsock_dev *d);
void dev_vq_kick(struct vsock_dev *d, unsigned idx);
void dev_rings_changed(struct vsock_dev *d);
void dev_transport_reset(struct vsock_dev *d, int err);

/* device.c: packet output */
void dev_rx_flush(struct vsock_dev *d);
void dev_queue_ctrl(struct vsock_dev *d, uint32_t host_port, uint32_t guest_port,
		    uint16_t type, uint16_t op);
void dev_schedule_notify(struct vsock_dev *d);
void dev_dispatch_notes(struct vsock_dev *d);

/* conn.c */
int conn_table_init(struct vsock_dev *d);
void conn_table_free(struct vsock_dev *d);
struct vsock_conn *conn_lookup(struct vsock_dev *d, uint32_t local_port, uint32_t peer_port);
void conn_handle_pkt(struct vsock_dev *d, const struct virtio_vsock_hdr *h,
		     const struct vring_chain *ch);
/* Fill one rx chain with the next packet of c.  Returns bytes written (0 if
 * c had nothing to send). */
uint32_t conn_fill_rx(struct vsock_conn *c, const struct vring_chain *ch);
bool conn_has_output(const struct vsock_conn *c);
void conn_reset(struct vsock_conn *c, int err, bool send_rst);
void conn_note(struct vsock_conn *c, unsigned notes);
void conn_free(struct vsock_conn *c);
void conn_dispatch(struct vsock_conn *c);
void conn_detach_all(struct vsock_dev *d);
void conn_update_sendq(struct vsock_conn *c);
void hdr_fill(struct virtio_vsock_hdr *h, const struct vsock_dev *d, uint32_t src_port,
	      uint32_t dst_port, uint16_t type, uint16_t op);

#endif
