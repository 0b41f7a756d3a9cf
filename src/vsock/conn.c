/* virtio-vsock connections: the table keyed by (host port, guest port), the
 * protocol state machine for packets the guest sends, credit accounting both
 * ways, and the host-side API (vsock_conn_*).
 *
 * Credit (virtio spec, "Device Operation: Flow Control"): a sender may have
 * peer_buf_alloc - (tx_cnt - peer_fwd_cnt) payload bytes in flight, all u32
 * arithmetic that wraps.  We advertise a buffer per connection (at most
 * VSOCK_BUF_ALLOC, less once the VM's connections hold much: see
 * conn_pick_buf_alloc) and never buffer more than that from the guest; we
 * tell the guest how much the host consumed (fwd_cnt) in every packet and
 * proactively with CREDIT_UPDATE, so a one-way guest->host flow never waits
 * for a reply that never comes. */
#include "config.h"

#include <string.h>
#include <endian.h>
#include <sys/socket.h>

#include "log.h"
#include "loop.h"
#include "util.h"
#include "vsock/vsock_int.h"

/* ---------------------------------------------------------------- table */

static unsigned conn_hash(const struct vsock_dev *d, uint32_t local, uint32_t peer)
{
	uint64_t k = ((uint64_t)local << 32 | peer) * 0x9E3779B97F4A7C15ull;

	return (unsigned)(k >> 32) & (d->nbuckets - 1);
}

int conn_table_init(struct vsock_dev *d)
{
	unsigned n = 64;

	while (n < d->max_conns && n < 65536)
		n <<= 1;
	d->buckets = calloc(n, sizeof(*d->buckets));
	if (!d->buckets)
		return -ENOMEM;
	d->nbuckets = n;
	list_head_init(&d->all);
	list_head_init(&d->sendq);
	list_head_init(&d->notifyq);
	return 0;
}

void conn_table_free(struct vsock_dev *d)
{
	free(d->buckets);
	d->buckets = NULL;
}

struct vsock_conn *conn_lookup(struct vsock_dev *d, uint32_t local_port, uint32_t peer_port)
{
	struct vsock_conn *c;

	for (c = d->buckets[conn_hash(d, local_port, peer_port)]; c; c = c->hnext)
		if (c->local_port == local_port && c->peer_port == peer_port)
			return c;
	return NULL;
}

/* What c holds against the device's budget: its whole window while the
 * guest can still send on it (hashed), then only what it still buffers for
 * the host.  Called wherever either changes. */
static void conn_sync_reserve(struct vsock_conn *c)
{
	uint32_t want = c->hashed ? c->buf_alloc : c->rx_bytes;

	if (!c->dev)
		return;
	c->dev->rx_reserved = c->dev->rx_reserved - c->reserved + want;
	c->reserved = want;
}

/* The buffer a new connection advertises, fixed for its life (a Linux 6.1
 * guest miscounts its credit if buf_alloc shrinks below what it has in
 * flight).  The guest may fill every connection's buffer and the host may
 * never read, so the sum of the windows is what a VM can make us hold.  A
 * connection gets an eighth of what is left of VSOCK_RX_BUDGET, between
 * VSOCK_BUF_MIN and VSOCK_BUF_ALLOC: the first 120 get the full window,
 * later ones less, and a VM holds at most VSOCK_RX_BUDGET +
 * max_conns * VSOCK_BUF_MIN (48 MiB at 4096 connections, not 1 GiB). */
static uint32_t conn_pick_buf_alloc(const struct vsock_dev *d)
{
	uint64_t left = d->rx_reserved < VSOCK_RX_BUDGET ? VSOCK_RX_BUDGET - d->rx_reserved : 0;

	return (uint32_t)MAX(MIN(left / 8, (uint64_t)VSOCK_BUF_ALLOC), (uint64_t)VSOCK_BUF_MIN);
}

static void conn_hash_add(struct vsock_conn *c)
{
	struct vsock_dev *d = c->dev;
	unsigned b = conn_hash(d, c->local_port, c->peer_port);

	c->hnext = d->buckets[b];
	d->buckets[b] = c;
	c->hashed = true;
	d->nconns++;
}

static void conn_unhash(struct vsock_conn *c)
{
	struct vsock_dev *d = c->dev;
	struct vsock_conn **pp;

	if (!c->hashed || !d)
		return;
	for (pp = &d->buckets[conn_hash(d, c->local_port, c->peer_port)]; *pp;
	     pp = &(*pp)->hnext) {
		if (*pp == c) {
			*pp = c->hnext;
			break;
		}
	}
	c->hashed = false;
	c->hnext = NULL;
	d->nconns--;
	conn_sync_reserve(c);
}

static struct vsock_conn *conn_new(struct vsock_dev *d, uint32_t local, uint32_t peer,
				   enum conn_state st)
{
	struct vsock_conn *c = calloc(1, sizeof(*c));

	if (!c)
		return NULL;
	c->dev = d;
	c->local_port = local;
	c->peer_port = peer;
	c->state = st;
	c->buf_alloc = conn_pick_buf_alloc(d);
	list_add_tail(&d->all, &c->all_node);
	conn_hash_add(c);
	conn_sync_reserve(c);
	return c;
}

/* Discard unread guest data; returns how much. */
static uint32_t conn_drop_rx(struct vsock_conn *c)
{
	uint32_t n = c->rx_bytes;

	while (c->rx_head) {
		struct rx_chunk *k = c->rx_head;
		c->rx_head = k->next;
		free(k);
	}
	c->rx_tail = NULL;
	c->rx_bytes = 0;
	conn_sync_reserve(c);
	return n;
}

static void conn_drop_buffers(struct vsock_conn *c)
{
	conn_drop_rx(c);
	free(c->txbuf);
	c->txbuf = NULL;
	c->tx_len = 0;
	c->tx_head = 0;
}

static void conn_cancel_timer(struct vsock_conn *c)
{
	if (c->timer) {
		loop_timer_cancel(c->timer);
		c->timer = NULL;
	}
}

/* Take c out of everything; the memory goes once no callback runs for it. */
void conn_free(struct vsock_conn *c)
{
	conn_unhash(c);
	list_del(&c->all_node);
	list_del(&c->send_node);
	list_del(&c->notify_node);
	conn_cancel_timer(c);
	conn_drop_buffers(c);
	c->dev = NULL;
	if (c->in_cb) {
		c->free_pending = true;
		return;
	}
	free(c);
}

void conn_note(struct vsock_conn *c, unsigned notes)
{
	struct vsock_dev *d = c->dev;

	if (c->host_closed || !d)
		return;
	c->notes |= notes;
	if (!list_linked(&c->notify_node))
		list_add_tail(&d->notifyq, &c->notify_node);
	dev_schedule_notify(d);
}

static bool cb_ok(const struct vsock_conn *c)
{
	return !c->host_closed && c->ops;
}

void conn_dispatch(struct vsock_conn *c)
{
	unsigned notes = c->notes;

	list_del(&c->notify_node);
	c->notes = 0;
	c->in_cb++;
	/* c->dev turns NULL if a callback freed the device: it already told
	 * c (closed), so nothing more is delivered */
	if ((notes & NOTE_ESTABLISHED) && cb_ok(c) && c->dev && c->ops->established)
		c->ops->established(c, c->arg);
	if ((notes & NOTE_READABLE) && cb_ok(c) && c->dev && c->ops->readable)
		c->ops->readable(c, c->arg);
	if ((notes & NOTE_WRITABLE) && cb_ok(c) && c->dev && c->ops->writable) {
		c->want_writable = false;
		c->ops->writable(c, c->arg);
	}
	if ((notes & NOTE_CLOSED) && cb_ok(c) && c->dev && c->ops->closed)
		c->ops->closed(c, c->arg, c->err);
	c->in_cb--;
	if (!c->in_cb && c->free_pending)
		free(c);
}

/* ---------------------------------------------------------------- credit */

static uint32_t conn_credit(const struct vsock_conn *c)
{
	uint32_t inflight = c->tx_cnt - c->peer_fwd_cnt;

	/* A guest may shrink buf_alloc below what is in flight. */
	if (inflight >= c->peer_buf_alloc)
		return 0;
	return c->peer_buf_alloc - inflight;
}

static bool conn_can_send_data(const struct vsock_conn *c)
{
	return (c->state == CONN_ESTABLISHED || c->state == CONN_CLOSING) &&
	       !(c->pend & PEND_RESPONSE) && !(c->peer_shut & VIRTIO_VSOCK_SHUTDOWN_RCV);
}

bool conn_has_output(const struct vsock_conn *c)
{
	if (!c->dev || c->state == CONN_DEAD || c->state == CONN_PEER_CLOSED)
		return false;
	if (c->pend & (PEND_REQUEST | PEND_RESPONSE | PEND_CREDIT))
		return true;
	if (c->state == CONN_CONNECTING)
		return false;
	if (c->tx_len && conn_can_send_data(c) && conn_credit(c) > 0)
		return true;
	/* SHUTDOWN(SEND) goes after the data it ends. */
	if ((c->pend & PEND_SHUTDOWN) &&
	    (c->tx_len == 0 || (c->peer_shut & VIRTIO_VSOCK_SHUTDOWN_RCV)))
		return true;
	return false;
}

void conn_update_sendq(struct vsock_conn *c)
{
	struct vsock_dev *d = c->dev;

	if (!d)
		return;
	if (conn_has_output(c)) {
		if (!list_linked(&c->send_node))
			list_add_tail(&d->sendq, &c->send_node);
	} else {
		list_del(&c->send_node);
	}
}

/* Tell the guest what the host consumed once its view of our free space
 * drops to three quarters of its window: small request/response traffic
 * never gets there (no extra packets), while a stream gets an update per
 * quarter window (64 KiB, one full packet) and so never runs dry: a Linux
 * guest that runs out of credit sleeps until the update comes, and under
 * TCG that sleep and wake-up cost more than the extra update (guest->host
 * through a socket: 226-245 MB/s with an update per half window, 272-281
 * MB/s with one per quarter).  The window is our buffer or the guest's
 * own, whichever is smaller: Linux caps its tx credit to its own buf_alloc,
 * so a guest with a smaller buffer never has more than that in flight, and
 * waiting for half of ours would stall it for good. */
static void conn_consumed(struct vsock_conn *c, uint32_t n)
{
	uint32_t window, guest_view_free;

	c->fwd_cnt += n;
	conn_sync_reserve(c);
	if (!c->dev || c->state == CONN_DEAD || c->state == CONN_PEER_CLOSED)
		return;
	window = MIN(c->buf_alloc, c->peer_buf_alloc);
	guest_view_free = window - MIN(window, c->rx_cnt - c->fwd_cnt_sent);
	if (c->fwd_cnt != c->fwd_cnt_sent && guest_view_free <= window / 4 * 3) {
		c->pend |= PEND_CREDIT;
		conn_update_sendq(c);
		dev_rx_flush(c->dev);
	}
}

static void conn_maybe_writable(struct vsock_conn *c)
{
	if (c->want_writable)
		conn_note(c, NOTE_WRITABLE);
}

/* ---------------------------------------------------------------- packets to the guest */

void hdr_fill(struct virtio_vsock_hdr *h, const struct vsock_dev *d, uint32_t src_port,
	      uint32_t dst_port, uint16_t type, uint16_t op)
{
	memset(h, 0, sizeof(*h));
	h->src_cid = htole64(VSOCK_HOST_CID);
	h->dst_cid = htole64(d->guest_cid);
	h->src_port = htole32(src_port);
	h->dst_port = htole32(dst_port);
	h->type = htole16(type);
	h->op = htole16(op);
}

uint32_t conn_fill_rx(struct vsock_conn *c, const struct vring_chain *ch)
{
	const struct iovec *iov = ch->iov + ch->nout;
	struct virtio_vsock_hdr h;
	uint32_t len = 0, flags = 0;
	uint16_t op;

	if (c->pend & PEND_REQUEST) {
		op = VIRTIO_VSOCK_OP_REQUEST;
		c->pend &= ~PEND_REQUEST;
	} else if (c->pend & PEND_RESPONSE) {
		op = VIRTIO_VSOCK_OP_RESPONSE;
		c->pend &= ~PEND_RESPONSE;
	} else if (c->tx_len && conn_can_send_data(c) && conn_credit(c) > 0 &&
		   ch->in_len > VSOCK_HDR_LEN) {
		uint32_t first;

		op = VIRTIO_VSOCK_OP_RW;
		len = MIN(c->tx_len, conn_credit(c));
		len = MIN(len, (uint32_t)MIN(ch->in_len - VSOCK_HDR_LEN, VSOCK_MAX_PKT));
		first = MIN(len, VSOCK_TXBUF - c->tx_head);
		iov_from_buf(iov, ch->nin, VSOCK_HDR_LEN, c->txbuf + c->tx_head, first);
		iov_from_buf(iov, ch->nin, VSOCK_HDR_LEN + first, c->txbuf, len - first);
		c->tx_head = (c->tx_head + len) % VSOCK_TXBUF;
		c->tx_len -= len;
		c->tx_cnt += len;
		conn_maybe_writable(c);
	} else if ((c->pend & PEND_SHUTDOWN) &&
		   (c->tx_len == 0 || (c->peer_shut & VIRTIO_VSOCK_SHUTDOWN_RCV))) {
		op = VIRTIO_VSOCK_OP_SHUTDOWN;
		flags = c->host_shut;
		c->shut_sent = c->host_shut;
		c->pend &= ~PEND_SHUTDOWN;
	} else if (c->pend & PEND_CREDIT) {
		op = VIRTIO_VSOCK_OP_CREDIT_UPDATE;
	} else {
		/* nothing that fits this buffer: to the back of the queue if
		 * there is output for a bigger one */
		list_del(&c->send_node);
		conn_update_sendq(c);
		return 0;
	}
	hdr_fill(&h, c->dev, c->local_port, c->peer_port, VIRTIO_VSOCK_TYPE_STREAM, op);
	h.len = htole32(len);
	h.flags = htole32(flags);
	h.buf_alloc = htole32(c->buf_alloc);
	h.fwd_cnt = htole32(c->fwd_cnt);
	/* every packet carries fwd_cnt: no separate update needed */
	c->fwd_cnt_sent = c->fwd_cnt;
	c->pend &= ~PEND_CREDIT;
	iov_from_buf(iov, ch->nin, 0, &h, sizeof(h));
	/* round robin: to the back of the queue if more is left */
	list_del(&c->send_node);
	conn_update_sendq(c);
	return VSOCK_HDR_LEN + len;
}

/* ---------------------------------------------------------------- timers */

static void conn_timeout_cb(void *arg)
{
	struct vsock_conn *c = arg;
	struct vsock_dev *d = c->dev;

	c->timer = NULL;
	dev_enter(d);
	if (c->state == CONN_CONNECTING) {
		/* No RESPONSE: give up and make sure the guest forgets it too. */
		if (!(c->pend & PEND_REQUEST))
			dev_queue_ctrl(d, c->local_port, c->peer_port, VIRTIO_VSOCK_TYPE_STREAM,
				       VIRTIO_VSOCK_OP_RST);
		conn_reset(c, ETIMEDOUT, false);
	} else if (c->state == CONN_CLOSING) {
		if (c->tx_len && c->tx_cnt != c->timer_tx_cnt) {
			/* still delivering: wait on */
			c->timer_tx_cnt = c->tx_cnt;
			c->timer = loop_timer_add(d->loop, d->close_timeout_ms, conn_timeout_cb,
						  c);
		} else {
			dev_queue_ctrl(d, c->local_port, c->peer_port, VIRTIO_VSOCK_TYPE_STREAM,
				       VIRTIO_VSOCK_OP_RST);
			conn_free(c);
		}
	}
	dev_rx_flush(d);
	dev_leave(d);
}

/* ---------------------------------------------------------------- state changes */

/* What ending a connection either way shares: the RST to the guest if asked,
 * then off the device's tables.  Returns false when that freed c (the host
 * side had closed it already). */
static bool conn_detach(struct vsock_conn *c, bool send_rst)
{
	if (send_rst && c->dev)
		dev_queue_ctrl(c->dev, c->local_port, c->peer_port, VIRTIO_VSOCK_TYPE_STREAM,
			       VIRTIO_VSOCK_OP_RST);
	if (c->host_closed) {
		conn_free(c);
		return false;
	}
	conn_unhash(c);
	list_del(&c->send_node);
	conn_cancel_timer(c);
	c->pend = 0;
	return true;
}

void conn_reset(struct vsock_conn *c, int err, bool send_rst)
{
	if (!conn_detach(c, send_rst))
		return;
	conn_drop_buffers(c);
	c->state = CONN_DEAD;
	c->err = err;
	conn_note(c, NOTE_CLOSED);
}

/* The guest closed both directions cleanly: it waits for our RST, and the
 * pair is free for reuse.  What it sent stays readable until EOF. */
static void conn_peer_closed(struct vsock_conn *c, bool send_rst)
{
	if (!conn_detach(c, send_rst))
		return;
	free(c->txbuf);
	c->txbuf = NULL;
	c->tx_len = 0;
	c->state = CONN_PEER_CLOSED;
	conn_note(c, NOTE_READABLE | (c->want_writable ? NOTE_WRITABLE : 0));
}

/* Buffer len payload bytes of the chain, starting off bytes into it. */
static int conn_rx_append(struct vsock_conn *c, const struct vring_chain *ch, uint32_t off,
			  uint32_t len)
{
	struct rx_chunk *k = c->rx_tail;
	uint32_t n = k ? MIN(len, k->cap - k->len) : 0;

	/* Fill the last chunk first, then one new chunk of at least 4 KiB:
	 * 1-byte writes from the guest cannot make us spend a malloc header per
	 * byte, and what we hold stays within 4 KiB of what was sent. */
	if (n) {
		iov_to_buf(ch->iov, ch->nout, off, k->data + k->len, n);
		k->len += n;
		c->rx_bytes += n;
	}
	if (n == len)
		return 0;
	k = malloc(sizeof(*k) + MAX(len - n, 4096u));
	if (!k)
		return -ENOMEM;
	k->next = NULL;
	k->off = 0;
	k->len = len - n;
	k->cap = MAX(len - n, 4096u);
	iov_to_buf(ch->iov, ch->nout, off + n, k->data, len - n);
	if (c->rx_tail)
		c->rx_tail->next = k;
	else
		c->rx_head = k;
	c->rx_tail = k;
	c->rx_bytes += len - n;
	return 0;
}

/* Offer the payload, still in guest memory, to an endpoint that takes data
 * as it arrives; only in order, so only when nothing is buffered before it.
 * Returns the bytes taken; the caller credits them back to the guest once it
 * is done with the chain (a credit update reuses the device's iov scratch). */
static uint32_t conn_deliver(struct vsock_conn *c, const struct vring_chain *ch, uint32_t len)
{
	struct iovec iov[VRING_MAX_IOV];
	unsigned cnt;
	size_t n;

	if (c->rx_bytes || !cb_ok(c) || !c->ops->deliver || c->in_cb)
		return 0;
	cnt = iov_slice(ch->iov, ch->nout, VSOCK_HDR_LEN, len, iov, VRING_MAX_IOV);
	c->in_cb++;
	n = c->ops->deliver(c, c->arg, iov, (int)cnt, len);
	c->in_cb--;
	return (uint32_t)MIN(n, (size_t)len);
}

static void conn_accept_new(struct vsock_dev *d, uint32_t host_port, uint32_t guest_port,
			    uint32_t buf_alloc, uint32_t fwd_cnt)
{
	struct vsock_conn *c;
	int r;

	if (!d->accept || d->nconns >= d->max_conns) {
		dev_queue_ctrl(d, host_port, guest_port, VIRTIO_VSOCK_TYPE_STREAM,
			       VIRTIO_VSOCK_OP_RST);
		return;
	}
	c = conn_new(d, host_port, guest_port, CONN_ESTABLISHED);
	if (!c) {
		dev_queue_ctrl(d, host_port, guest_port, VIRTIO_VSOCK_TYPE_STREAM,
			       VIRTIO_VSOCK_OP_RST);
		return;
	}
	c->peer_buf_alloc = buf_alloc;
	c->peer_fwd_cnt = fwd_cnt;
	/* RESPONSE is queued before accept() so that anything the host does
	 * from inside accept (write, shutdown, close) lands after it. */
	c->pend = PEND_RESPONSE;
	c->in_cb++;
	r = d->accept(d->accept_arg, c, host_port, guest_port);
	c->in_cb--;
	if (r < 0) {
		dev_queue_ctrl(d, host_port, guest_port, VIRTIO_VSOCK_TYPE_STREAM,
			       VIRTIO_VSOCK_OP_RST);
		c->host_closed = true;
		conn_free(c);
		return;
	}
	if (c->free_pending) {
		free(c);
		return;
	}
	conn_update_sendq(c);
}

void conn_handle_pkt(struct vsock_dev *d, const struct virtio_vsock_hdr *h,
		     const struct vring_chain *ch)
{
	uint64_t src_cid = le64toh(h->src_cid), dst_cid = le64toh(h->dst_cid);
	uint32_t guest_port = le32toh(h->src_port), host_port = le32toh(h->dst_port);
	uint32_t len = le32toh(h->len), flags = le32toh(h->flags);
	uint16_t type = le16toh(h->type), op = le16toh(h->op);
	uint32_t credit_before, taken;
	struct vsock_conn *c;

	/* A guest speaks only for itself and only to the host. */
	if (src_cid != d->guest_cid || dst_cid != VSOCK_HOST_CID) {
		d->stats.dropped++;
		log_debug("vsock: dropping packet %llu:%u -> %llu:%u", (unsigned long long)src_cid,
			  guest_port, (unsigned long long)dst_cid, host_port);
		return;
	}
	if (len > VSOCK_MAX_PKT || len > ch->out_len - VSOCK_HDR_LEN ||
	    (len && op != VIRTIO_VSOCK_OP_RW)) {
		d->stats.dropped++;
		log_debug("vsock: dropping packet with bad length %u (op %u)", len, op);
		return;
	}
	if (type != VIRTIO_VSOCK_TYPE_STREAM) {
		if (op != VIRTIO_VSOCK_OP_RST)
			dev_queue_ctrl(d, host_port, guest_port, type, VIRTIO_VSOCK_OP_RST);
		return;
	}
	c = conn_lookup(d, host_port, guest_port);
	if (op == VIRTIO_VSOCK_OP_REQUEST) {
		/* The guest forgot the old connection (it reused the pair). */
		if (c)
			conn_reset(c, ECONNRESET, false);
		conn_accept_new(d, host_port, guest_port, le32toh(h->buf_alloc),
				le32toh(h->fwd_cnt));
		return;
	}
	if (!c) {
		/* Never answer a RST with a RST: a stale one could kill a new
		 * connection that reuses the pair. */
		if (op != VIRTIO_VSOCK_OP_RST)
			dev_queue_ctrl(d, host_port, guest_port, type, VIRTIO_VSOCK_OP_RST);
		return;
	}
	if (op == VIRTIO_VSOCK_OP_RST) {
		if (c->state == CONN_CONNECTING)
			conn_reset(c, ECONNREFUSED, false);
		else if (c->state == CONN_CLOSING)
			conn_free(c); /* the answer to our SHUTDOWN: done */
		else if (c->peer_shut & VIRTIO_VSOCK_SHUTDOWN_SEND)
			conn_peer_closed(c, false); /* it had finished sending: EOF, not error */
		else
			conn_reset(c, ECONNRESET, false);
		return;
	}

	credit_before = conn_credit(c);
	c->peer_buf_alloc = le32toh(h->buf_alloc);
	c->peer_fwd_cnt = le32toh(h->fwd_cnt);

	switch (op) {
	case VIRTIO_VSOCK_OP_RESPONSE:
		if (c->state != CONN_CONNECTING) {
			conn_reset(c, ECONNRESET, true);
			return;
		}
		conn_cancel_timer(c);
		c->state = CONN_ESTABLISHED;
		conn_note(c, NOTE_ESTABLISHED);
		break;
	case VIRTIO_VSOCK_OP_RW:
		if (c->state == CONN_CONNECTING) {
			conn_reset(c, ECONNRESET, true);
			return;
		}
		c->rx_cnt += len;
		if (c->peer_shut & VIRTIO_VSOCK_SHUTDOWN_SEND) {
			d->stats.dropped++; /* data after its own SHUTDOWN(SEND) */
			break;
		}
		if (c->state == CONN_CLOSING || (c->host_shut & VIRTIO_VSOCK_SHUTDOWN_RCV)) {
			conn_consumed(c, len); /* nobody will read it */
			break;
		}
		if (c->rx_bytes + len > c->buf_alloc) {
			log_debug("vsock: guest port %u overran its credit", guest_port);
			conn_reset(c, ECONNRESET, true);
			return;
		}
		if (len == 0)
			break;
		taken = conn_deliver(c, ch, len);
		if (taken < len) {
			if (conn_rx_append(c, ch, VSOCK_HDR_LEN + taken, len - taken) < 0) {
				conn_reset(c, ENOMEM, true);
				return;
			}
			conn_note(c, NOTE_READABLE);
		}
		if (taken)
			conn_consumed(c, taken);
		break;
	case VIRTIO_VSOCK_OP_CREDIT_UPDATE:
		break;
	case VIRTIO_VSOCK_OP_CREDIT_REQUEST:
		c->pend |= PEND_CREDIT;
		break;
	case VIRTIO_VSOCK_OP_SHUTDOWN:
		c->peer_shut |= flags & VSOCK_SHUTDOWN_BOTH;
		if ((c->peer_shut & VSOCK_SHUTDOWN_BOTH) == VSOCK_SHUTDOWN_BOTH) {
			conn_peer_closed(c, true);
			return;
		}
		if (flags & VIRTIO_VSOCK_SHUTDOWN_SEND)
			conn_note(c, NOTE_READABLE); /* EOF */
		if (flags & VIRTIO_VSOCK_SHUTDOWN_RCV) {
			/* nobody will read what is queued: writers get EPIPE */
			c->tx_len = 0;
			conn_maybe_writable(c);
		}
		break;
	default:
		conn_reset(c, ECONNRESET, true);
		return;
	}
	if (conn_credit(c) > credit_before)
		conn_maybe_writable(c);
	conn_update_sendq(c);
}

/* ---------------------------------------------------------------- zero-copy into rx buffers */

typedef ssize_t (*fill_fn)(void *ctx, const struct iovec *iov, int cnt);

struct mem_src {
	const uint8_t *p;
	size_t len;
};

static ssize_t fill_from_mem(void *ctx, const struct iovec *iov, int cnt)
{
	struct mem_src *s = ctx;
	size_t done = 0;
	int i;

	for (i = 0; i < cnt && done < s->len; i++) {
		size_t n = MIN(iov[i].iov_len, s->len - done);
		memcpy(iov[i].iov_base, s->p + done, n);
		done += n;
	}
	return (ssize_t)done;
}

static ssize_t fill_from_fd(void *ctx, const struct iovec *iov, int cnt)
{
	int fd = *(int *)ctx;
	ssize_t n;

	do
		n = readv(fd, iov, cnt);
	while (n < 0 && errno == EINTR);
	return n < 0 ? -errno : n;
}

/* May c put bytes straight into rx buffers, skipping txbuf?  Only when
 * nothing of its own is queued ahead and no other connection waits (the
 * direct path must not jump the device's queue). */
static bool conn_direct_ok(struct vsock_conn *c)
{
	struct vsock_dev *d = c->dev;

	if (c->state != CONN_ESTABLISHED || c->tx_len || (c->pend & PEND_RESPONSE) ||
	    !vq_ready(&d->vq[VQ_RX]))
		return false;
	if (d->ctrl_len || !list_empty(&d->sendq))
		dev_rx_flush(d);
	return d->ctrl_len == 0 && list_empty(&d->sendq);
}

/* Pop rx chains, let fill() write payload into them in one go, then put the
 * headers in front.  Returns bytes moved, 0 when fill reports EOF or no chain
 * is available (*no_room set), -errno from fill. */
static ssize_t conn_send_direct(struct vsock_conn *c, fill_fn fill, void *ctx, size_t max,
				bool *no_room)
{
	struct vsock_dev *d = c->dev;
	struct vq *vr = &d->vq[VQ_RX];
	struct {
		uint16_t head;
		uint32_t cap;
		unsigned iov0, niov;
	} ch_info[VSOCK_SPLICE_CHAINS];
	static struct iovec piov[VRING_MAX_IOV]; /* under the big lock */
	unsigned nch = 0, used = 0, npiov = 0, i;
	size_t limit = MIN(max, (size_t)conn_credit(c)), total = 0;
	bool can_unpop = true;
	ssize_t n;

	*no_room = false;
	while (total < limit && nch < VSOCK_SPLICE_CHAINS && used < VRING_MAX_IOV) {
		struct vring_chain ch;
		uint32_t cap;
		int r = vq_pop(vr, &d->mem, &ch, d->siov + used, VRING_MAX_IOV - used);

		if (r == 0 || r == -ENOSPC)
			break;
		if (r < 0) {
			/* a bad chain was consumed in the middle: earlier ones
			 * can no longer be given back by rewinding */
			can_unpop = false;
			break;
		}
		if (ch.in_len <= VSOCK_HDR_LEN) {
			vq_push(vr, ch.head, 0); /* no room for a packet: useless buffer */
			can_unpop = false;
			break;
		}
		cap = (uint32_t)MIN(MIN(ch.in_len - VSOCK_HDR_LEN, VSOCK_MAX_PKT), limit - total);
		ch_info[nch].head = ch.head;
		ch_info[nch].cap = cap;
		ch_info[nch].iov0 = used + ch.nout;
		ch_info[nch].niov = ch.nin;
		npiov += iov_slice(ch.iov + ch.nout, ch.nin, VSOCK_HDR_LEN, cap, piov + npiov,
				   VRING_MAX_IOV - npiov);
		used += ch.nout + ch.nin;
		total += cap;
		nch++;
	}
	if (nch == 0) {
		*no_room = true;
		vq_notify(vr);
		return 0;
	}
	n = fill(ctx, piov, (int)npiov);
	total = n > 0 ? (size_t)n : 0;
	for (i = 0; i < nch && total > 0; i++) {
		struct virtio_vsock_hdr h;
		uint32_t m = (uint32_t)MIN((size_t)ch_info[i].cap, total);

		hdr_fill(&h, d, c->local_port, c->peer_port, VIRTIO_VSOCK_TYPE_STREAM,
			 VIRTIO_VSOCK_OP_RW);
		h.len = htole32(m);
		h.buf_alloc = htole32(c->buf_alloc);
		h.fwd_cnt = htole32(c->fwd_cnt);
		iov_from_buf(d->siov + ch_info[i].iov0, ch_info[i].niov, 0, &h, sizeof(h));
		vq_push(vr, ch_info[i].head, VSOCK_HDR_LEN + m);
		d->stats.rx_pkts++;
		total -= m;
		c->tx_cnt += m;
	}
	if (i > 0) {
		c->fwd_cnt_sent = c->fwd_cnt;
		c->pend &= ~PEND_CREDIT;
	}
	if (can_unpop) {
		vq_unpop(vr, nch - i);
	} else {
		for (; i < nch; i++)
			vq_push(vr, ch_info[i].head, 0);
	}
	vq_notify(vr);
	return n;
}

/* ---------------------------------------------------------------- host API */

void vsock_conn_set_ops(struct vsock_conn *c, const struct vsock_conn_ops *ops, void *arg)
{
	c->ops = ops;
	c->arg = arg;
	if (!ops || c->host_closed)
		return;
	/* Whatever happened before the endpoint was attached is announced now. */
	if (c->rx_bytes || (c->peer_shut & VIRTIO_VSOCK_SHUTDOWN_SEND) ||
	    c->state == CONN_PEER_CLOSED)
		conn_note(c, NOTE_READABLE);
	if (c->state == CONN_DEAD) {
		if (c->dev)
			conn_note(c, NOTE_CLOSED);
	}
}

uint32_t vsock_conn_local_port(const struct vsock_conn *c)
{
	return c->local_port;
}

uint32_t vsock_conn_peer_port(const struct vsock_conn *c)
{
	return c->peer_port;
}

size_t vsock_conn_readable(const struct vsock_conn *c)
{
	return c->state == CONN_DEAD ? 0 : c->rx_bytes;
}

static bool conn_eof(const struct vsock_conn *c)
{
	return c->state == CONN_PEER_CLOSED || (c->peer_shut & VIRTIO_VSOCK_SHUTDOWN_SEND) ||
	       (c->host_shut & VIRTIO_VSOCK_SHUTDOWN_RCV);
}

ssize_t vsock_conn_read(struct vsock_conn *c, void *buf, size_t len)
{
	const struct rx_chunk *k;
	size_t done = 0;

	if (c->state == CONN_DEAD)
		return -ECONNRESET;
	if (c->rx_bytes == 0)
		return conn_eof(c) ? 0 : -EAGAIN;
	for (k = c->rx_head; k && done < len; k = k->next) {
		size_t n = MIN(len - done, (size_t)(k->len - k->off));

		memcpy((uint8_t *)buf + done, k->data + k->off, n);
		done += n;
	}
	vsock_conn_consume(c, done);
	return (ssize_t)done;
}

int vsock_conn_peek(const struct vsock_conn *c, struct iovec *iov, int max, size_t len)
{
	const struct rx_chunk *k;
	int cnt = 0;

	if (c->state == CONN_DEAD)
		return -ECONNRESET;
	for (k = c->rx_head; k && cnt < max && len > 0; k = k->next, cnt++) {
		size_t n = MIN(len, (size_t)(k->len - k->off));
		iov[cnt].iov_base = (void *)(k->data + k->off);
		iov[cnt].iov_len = n;
		len -= n;
	}
	return cnt;
}

void vsock_conn_consume(struct vsock_conn *c, size_t n)
{
	size_t done = 0;

	if (c->state == CONN_DEAD)
		return;
	n = MIN(n, (size_t)c->rx_bytes);
	while (done < n && c->rx_head) {
		struct rx_chunk *k = c->rx_head;
		size_t take = MIN(n - done, (size_t)(k->len - k->off));

		k->off += (uint32_t)take;
		done += take;
		if (k->off == k->len) {
			c->rx_head = k->next;
			if (!c->rx_head)
				c->rx_tail = NULL;
			free(k);
		}
	}
	c->rx_bytes -= (uint32_t)done;
	conn_consumed(c, (uint32_t)done);
}

ssize_t vsock_conn_splice_to_fd(struct vsock_conn *c, int fd)
{
	struct iovec iov[64];
	struct msghdr mh = { .msg_iov = iov };
	struct rx_chunk *k;
	size_t left;
	ssize_t n;
	int cnt = 0;

	if (c->state == CONN_DEAD)
		return -ECONNRESET;
	if (c->rx_bytes == 0)
		return conn_eof(c) ? 0 : -EAGAIN;
	for (k = c->rx_head; k && cnt < (int)ARRAY_SIZE(iov); k = k->next, cnt++) {
		iov[cnt].iov_base = k->data + k->off;
		iov[cnt].iov_len = k->len - k->off;
	}
	mh.msg_iovlen = (size_t)cnt;
	do
		n = sendmsg(fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
	while (n < 0 && errno == EINTR);
	if (n < 0 && errno == ENOTSOCK) {
		do
			n = writev(fd, iov, cnt);
		while (n < 0 && errno == EINTR);
	}
	if (n < 0)
		return -errno;
	for (left = (size_t)n; left > 0;) {
		k = c->rx_head;
		size_t m = MIN(left, (size_t)(k->len - k->off));
		k->off += (uint32_t)m;
		left -= m;
		if (k->off == k->len) {
			c->rx_head = k->next;
			if (!c->rx_head)
				c->rx_tail = NULL;
			free(k);
		}
	}
	c->rx_bytes -= (uint32_t)n;
	conn_consumed(c, (uint32_t)n);
	return n;
}

static int conn_tx_check(const struct vsock_conn *c)
{
	if (c->state == CONN_DEAD)
		return -ECONNRESET;
	if (!c->dev || c->state == CONN_PEER_CLOSED || c->host_closed ||
	    (c->peer_shut & VIRTIO_VSOCK_SHUTDOWN_RCV) ||
	    (c->host_shut & VIRTIO_VSOCK_SHUTDOWN_SEND))
		return -EPIPE;
	return 0;
}

static int conn_txbuf_alloc(struct vsock_conn *c)
{
	if (!c->txbuf) {
		c->txbuf = malloc(VSOCK_TXBUF);
		if (!c->txbuf)
			return -ENOMEM;
		c->tx_head = c->tx_len = 0;
	}
	return 0;
}

ssize_t vsock_conn_write(struct vsock_conn *c, const void *buf, size_t len)
{
	struct mem_src src = { buf, len };
	size_t done = 0;
	bool no_room;
	int r = conn_tx_check(c);

	if (r < 0)
		return r;
	if (len == 0)
		return 0;
	if (conn_direct_ok(c)) {
		ssize_t n = conn_send_direct(c, fill_from_mem, &src, len, &no_room);
		if (n > 0)
			done = (size_t)n;
	}
	if (done < len && c->tx_len < VSOCK_TXBUF && conn_txbuf_alloc(c) == 0) {
		size_t room = VSOCK_TXBUF - c->tx_len, n = MIN(len - done, room);
		uint32_t tail = (c->tx_head + c->tx_len) % VSOCK_TXBUF;
		size_t first = MIN(n, (size_t)(VSOCK_TXBUF - tail));

		memcpy(c->txbuf + tail, (const uint8_t *)buf + done, first);
		memcpy(c->txbuf, (const uint8_t *)buf + done + first, n - first);
		c->tx_len += (uint32_t)n;
		done += n;
		conn_update_sendq(c);
		dev_rx_flush(c->dev);
	}
	if (done < len)
		c->want_writable = true;
	return done ? (ssize_t)done : -EAGAIN;
}

ssize_t vsock_conn_splice_from_fd(struct vsock_conn *c, int fd)
{
	bool no_room = false;
	ssize_t n;
	int r = conn_tx_check(c);

	if (r < 0)
		return r;
	/* Without credit the bytes go to txbuf like vsock_conn_write's: the
	 * caller was told there is room (vsock_conn_writable counts txbuf), and
	 * an -EAGAIN here would leave it polling a readable fd in a busy loop.
	 * Once txbuf is full, the bytes left in the fd are the backpressure. */
	if (conn_direct_ok(c) && conn_credit(c) > 0) {
		n = conn_send_direct(c, fill_from_fd, &fd, SIZE_MAX, &no_room);
		if (!no_room)
			return n;
	}
	/* Queue behind what is pending (or no rx buffer or credit right now). */
	if (c->tx_len >= VSOCK_TXBUF || conn_txbuf_alloc(c) < 0) {
		c->want_writable = true;
		return -EAGAIN;
	} else {
		uint32_t tail = (c->tx_head + c->tx_len) % VSOCK_TXBUF;
		uint32_t room = VSOCK_TXBUF - c->tx_len;
		struct iovec iov[2] = {
			{ c->txbuf + tail, MIN(room, VSOCK_TXBUF - tail) },
			{ c->txbuf, room - MIN(room, VSOCK_TXBUF - tail) },
		};
		n = fill_from_fd(&fd, iov, iov[1].iov_len ? 2 : 1);
		if (n <= 0)
			return n;
		c->tx_len += (uint32_t)n;
		conn_update_sendq(c);
		dev_rx_flush(c->dev);
		return n;
	}
}

size_t vsock_conn_writable(const struct vsock_conn *c)
{
	struct vsock_conn *mc = (struct vsock_conn *)c; /* the flag is bookkeeping */
	size_t room;

	if (conn_tx_check(c) < 0)
		return 0;
	room = VSOCK_TXBUF - c->tx_len;
	if (c->tx_len == 0 && c->state == CONN_ESTABLISHED)
		room += conn_credit(c);
	if (room == 0)
		mc->want_writable = true;
	return room;
}

int vsock_conn_shutdown(struct vsock_conn *c, int how)
{
	uint32_t f;

	if (how == SHUT_RD)
		f = VIRTIO_VSOCK_SHUTDOWN_RCV;
	else if (how == SHUT_WR)
		f = VIRTIO_VSOCK_SHUTDOWN_SEND;
	else if (how == SHUT_RDWR)
		f = VSOCK_SHUTDOWN_BOTH;
	else
		return -EINVAL;
	if (c->state == CONN_DEAD)
		return -ENOTCONN;
	if (!c->dev || c->state == CONN_PEER_CLOSED)
		return 0; /* the guest closed already; nothing to tell it */
	if ((c->host_shut | f) == c->host_shut)
		return 0;
	c->host_shut |= f;
	if (f & VIRTIO_VSOCK_SHUTDOWN_RCV)
		c->fwd_cnt += conn_drop_rx(c); /* unread data: the guest gets its credit back */
	c->pend |= PEND_SHUTDOWN;
	conn_update_sendq(c);
	dev_rx_flush(c->dev);
	return 0;
}

void vsock_conn_close(struct vsock_conn *c)
{
	struct vsock_dev *d;

	if (!c || c->host_closed)
		return;
	d = c->dev;
	c->host_closed = true;
	c->ops = NULL;
	c->notes = 0;
	list_del(&c->notify_node);
	if (!d || c->state == CONN_DEAD || c->state == CONN_PEER_CLOSED) {
		conn_free(c);
		return;
	}
	if (c->state == CONN_CONNECTING) {
		if (!(c->pend & PEND_REQUEST))
			dev_queue_ctrl(d, c->local_port, c->peer_port, VIRTIO_VSOCK_TYPE_STREAM,
				       VIRTIO_VSOCK_OP_RST);
		conn_free(c);
		dev_rx_flush(d);
		return;
	}
	/* Deliver what is queued, then SHUTDOWN(both); RST if the guest does
	 * not answer (or does not take the data) in time. */
	c->state = CONN_CLOSING;
	c->fwd_cnt += conn_drop_rx(c);
	c->host_shut = VSOCK_SHUTDOWN_BOTH;
	c->pend |= PEND_SHUTDOWN;
	conn_cancel_timer(c);
	c->timer_tx_cnt = c->tx_cnt;
	c->timer = loop_timer_add(d->loop, d->close_timeout_ms, conn_timeout_cb, c);
	conn_update_sendq(c);
	dev_rx_flush(d);
}

/* ---------------------------------------------------------------- host-initiated connect */

struct vsock_conn *vsock_connect(struct vsock_dev *d, uint32_t guest_port,
				 const struct vsock_conn_ops *ops, void *arg)
{
	struct vsock_conn *c;
	uint32_t port = 0;
	unsigned tries;

	if (!vsock_dev_ready(d)) {
		errno = ENOTCONN;
		return NULL;
	}
	if (d->nconns >= d->max_conns) {
		errno = EMFILE;
		return NULL;
	}
	/* Walk the ephemeral range so a port pair is not reused soon after it
	 * was closed (a late RST must not hit its successor). */
	for (tries = 0; tries < 65536; tries++) {
		port = d->next_port++;
		if (d->next_port == 0 || d->next_port < VSOCK_EPHEMERAL_FIRST)
			d->next_port = VSOCK_EPHEMERAL_FIRST;
		if (!conn_lookup(d, port, guest_port))
			break;
	}
	if (tries == 65536) {
		errno = EADDRINUSE;
		return NULL;
	}
	c = conn_new(d, port, guest_port, CONN_CONNECTING);
	if (!c) {
		errno = ENOMEM;
		return NULL;
	}
	c->ops = ops;
	c->arg = arg;
	c->pend = PEND_REQUEST;
	c->timer = loop_timer_add(d->loop, d->connect_timeout_ms, conn_timeout_cb, c);
	conn_update_sendq(c);
	dev_rx_flush(d);
	return c;
}

/* The device goes away: every connection still held by the host is told
 * (closed(ECONNRESET)) right now and lives on detached until
 * vsock_conn_close; those the host already let go are freed. */
void conn_detach_all(struct vsock_dev *d)
{
	while (!list_empty(&d->all)) {
		struct vsock_conn *c = container_of(d->all.next, struct vsock_conn, all_node);
		unsigned notes = c->notes;

		conn_unhash(c);
		list_del(&c->all_node);
		list_del(&c->send_node);
		list_del(&c->notify_node);
		conn_cancel_timer(c);
		c->notes = 0;
		if (c->host_closed) {
			conn_free(c);
			continue;
		}
		c->dev = NULL;
		if (c->state == CONN_CONNECTING || c->state == CONN_ESTABLISHED) {
			conn_drop_buffers(c);
			c->state = CONN_DEAD;
			c->err = ECONNRESET;
			notes |= NOTE_CLOSED;
		}
		if ((notes & NOTE_CLOSED) && cb_ok(c) && c->ops->closed) {
			c->in_cb++;
			c->ops->closed(c, c->arg, c->err);
			c->in_cb--;
			if (!c->in_cb && c->free_pending)
				free(c);
		}
	}
}
