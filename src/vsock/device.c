/* The vsock device: lifecycle (vsock_dev_*), the two virtqueues' processing,
 * the queue of connection-less replies, and deferred host callbacks.
 *
 * tx (guest -> device) is always drained, whatever the state of rx: replies a
 * packet needs are recorded per connection (pend bits, at most one entry per
 * connection in sendq) or in the bounded ctrlq, never by waiting for an rx
 * buffer.  That is what keeps guest and device from deadlocking when both
 * queues fill up. */
#include "config.h"

#include <string.h>
#include <endian.h>

#include "log.h"
#include "loop.h"
#include "util.h"
#include "vsock/vsock_int.h"

/* tx packets handled per kick before yielding to other devices / fds */
#define TX_BUDGET 1024

static void notify_timer_cb(void *arg);

void dev_enter(struct vsock_dev *d)
{
	d->busy++;
}

static void dev_final_free(struct vsock_dev *d)
{
	conn_table_free(d);
	free(d->socket_path);
	free(d);
}

bool dev_leave(struct vsock_dev *d)
{
	if (d->busy == 1 && !d->freed)
		dev_dispatch_notes(d);
	if (--d->busy == 0 && d->freed) {
		dev_final_free(d);
		return false;
	}
	return true;
}

void dev_schedule_notify(struct vsock_dev *d)
{
	/* Inside our own loop callbacks the notes go out at dev_leave; from an
	 * API call (FUSE thread or someone else's callback) they wait for the
	 * loop, so the caller never sees its own callbacks re-entered. */
	if (d->busy || d->notify_timer || d->freed)
		return;
	d->notify_timer = loop_timer_add(d->loop, 0, notify_timer_cb, d);
}

void dev_dispatch_notes(struct vsock_dev *d)
{
	while (!d->freed && !list_empty(&d->notifyq)) {
		struct vsock_conn *c = container_of(d->notifyq.next, struct vsock_conn, notify_node);
		conn_dispatch(c);
	}
}

static void dev_process_tx(struct vsock_dev *d);

static void notify_timer_cb(void *arg)
{
	struct vsock_dev *d = arg;

	d->notify_timer = NULL;
	dev_enter(d);
	/* also the continuation of a tx drain that used up its budget */
	dev_process_tx(d);
	dev_rx_flush(d);
	dev_leave(d);
}

void dev_queue_ctrl(struct vsock_dev *d, uint32_t host_port, uint32_t guest_port,
		    uint16_t type, uint16_t op)
{
	struct vsock_ctrl_pkt *p;

	if (d->ctrl_len == VSOCK_CTRLQ) {
		/* Full: a guest flooding us with junk loses some RSTs; its
		 * sockets time out instead. */
		d->stats.ctrl_dropped++;
		return;
	}
	p = &d->ctrlq[(d->ctrl_head + d->ctrl_len++) % VSOCK_CTRLQ];
	p->src_port = host_port;
	p->dst_port = guest_port;
	p->type = type;
	p->op = op;
	if (op == VIRTIO_VSOCK_OP_RST)
		d->stats.rst_sent++;
}

void dev_rx_flush(struct vsock_dev *d)
{
	struct vq *vr;

	if (!d || d->fd < 0)
		return;
	vr = &d->vq[VQ_RX];
	while (vq_ready(vr) && (d->ctrl_len || !list_empty(&d->sendq))) {
		struct vring_chain ch;
		uint32_t len = 0;
		int r = vq_pop(vr, &d->mem, &ch, d->iov, VRING_MAX_IOV);

		if (r == 0) {
			if (vq_empty_arm(vr))
				break;
			continue;
		}
		if (r == -EIO)
			break;
		if (r < 0)
			continue;
		if (ch.in_len < VSOCK_HDR_LEN) {
			vq_push(vr, ch.head, 0); /* cannot hold a header */
			continue;
		}
		if (d->ctrl_len) {
			struct vsock_ctrl_pkt *p = &d->ctrlq[d->ctrl_head];
			struct virtio_vsock_hdr h;

			hdr_fill(&h, d, p->src_port, p->dst_port, p->type, p->op);
			iov_from_buf(ch.iov + ch.nout, ch.nin, 0, &h, sizeof(h));
			d->ctrl_head = (d->ctrl_head + 1) % VSOCK_CTRLQ;
			d->ctrl_len--;
			len = VSOCK_HDR_LEN;
		}
		for (struct vsock_conn *first = NULL; !len && !list_empty(&d->sendq);) {
			struct vsock_conn *c = container_of(d->sendq.next, struct vsock_conn,
							    send_node);
			/* Round the queue once at most: a buffer with room for
			 * a header only fits no data (conn_fill_rx sends those
			 * to the back), and without this check such a buffer
			 * spun here forever. */
			if (c == first)
				break;
			if (!first)
				first = c;
			len = conn_fill_rx(c, &ch);
		}
		if (!len) {
			vq_unpop(vr, 1);
			break;
		}
		vq_push(vr, ch.head, len);
		d->stats.rx_pkts++;
	}
	vq_notify(vr);
}

static void dev_process_tx(struct vsock_dev *d)
{
	struct vq *vr = &d->vq[VQ_TX];
	unsigned n = 0;

	if (d->fd < 0)
		return;
	while (vq_ready(vr)) {
		struct virtio_vsock_hdr h;
		struct vring_chain ch;
		int r;

		if (n++ == TX_BUDGET) {
			/* more later; let other fds run meanwhile */
			if (!d->notify_timer)
				d->notify_timer = loop_timer_add(d->loop, 0, notify_timer_cb, d);
			break;
		}
		r = vq_pop(vr, &d->mem, &ch, d->iov, VRING_MAX_IOV);
		if (r == 0) {
			if (vq_empty_arm(vr))
				break;
			continue;
		}
		if (r == -EIO)
			break;
		if (r < 0) {
			d->stats.dropped++;
			continue;
		}
		d->stats.tx_pkts++;
		if (ch.out_len >= VSOCK_HDR_LEN) {
			/* The header may span descriptors: copy it out whole. */
			iov_to_buf(ch.iov, ch.nout, 0, &h, sizeof(h));
			conn_handle_pkt(d, &h, &ch);
			/* accept() may have freed the device (rings are gone) */
			if (d->fd < 0 || d->freed)
				return;
		} else {
			d->stats.dropped++;
		}
		vq_push(vr, ch.head, 0);
		/* hand buffers back in batches so the guest can refill early */
		if (n % 64 == 0)
			vq_notify(vr);
	}
	vq_notify(vr);
}

void dev_vq_kick(struct vsock_dev *d, unsigned idx)
{
	dev_enter(d);
	if (idx == VQ_TX)
		dev_process_tx(d);
	/* rx kick = new buffers; tx may have queued replies */
	dev_rx_flush(d);
	if (idx == VQ_RX) {
		/* room in rx: connections that were waiting may write again */
		struct list_node *n;
		for (n = d->all.next; n != &d->all; n = n->next) {
			struct vsock_conn *c = container_of(n, struct vsock_conn, all_node);
			if (c->want_writable && c->tx_len < VSOCK_TXBUF)
				conn_note(c, NOTE_WRITABLE);
		}
	}
	dev_leave(d);
}

static bool dev_rings_ready(const struct vsock_dev *d)
{
	return d->fd >= 0 && vq_ready(&d->vq[VQ_RX]) && vq_ready(&d->vq[VQ_TX]);
}

void dev_rings_changed(struct vsock_dev *d)
{
	if (!dev_rings_ready(d)) {
		/* A ring stopped or was disabled: the guest driver is being
		 * reset (reboot, module unload, VM stop), so are its sockets. */
		if (d->nconns || d->ctrl_len)
			dev_transport_reset(d, ECONNRESET);
		return;
	}
	/* Started: the guest may have queued packets before we looked. */
	dev_process_tx(d);
	dev_rx_flush(d);
}

void dev_transport_reset(struct vsock_dev *d, int err)
{
	struct list_node *n, *next;

	d->ctrl_len = 0;
	for (n = d->all.next; n != &d->all; n = next) {
		struct vsock_conn *c = container_of(n, struct vsock_conn, all_node);
		next = n->next;
		if (c->state == CONN_DEAD)
			continue;
		if (c->state == CONN_PEER_CLOSED) {
			/* clean close already; only unread data remains */
			continue;
		}
		conn_reset(c, err, false);
	}
}

/* ---------------------------------------------------------------- API */

struct vsock_dev *vsock_dev_new(struct loop *l, const struct vsock_dev_config *cfg)
{
	struct vsock_dev *d;
	unsigned i;
	int r;

	if (!cfg || !cfg->socket_path || cfg->guest_cid < 3 || cfg->guest_cid > UINT32_MAX - 1) {
		errno = EINVAL;
		return NULL;
	}
	d = calloc(1, sizeof(*d));
	if (!d)
		return NULL;
	d->loop = l;
	d->guest_cid = cfg->guest_cid;
	d->max_conns = cfg->max_conns ? cfg->max_conns : VSOCK_DEFAULT_MAX_CONNS;
	d->accept = cfg->accept;
	d->accept_arg = cfg->accept_arg;
	d->close_timeout_ms = cfg->close_timeout_ms ? cfg->close_timeout_ms : VSOCK_CLOSE_TIMEOUT_MS;
	d->connect_timeout_ms =
		cfg->connect_timeout_ms ? cfg->connect_timeout_ms : VSOCK_CONNECT_TIMEOUT_MS;
	d->listen_fd = -1;
	d->fd = -1;
	d->next_port = VSOCK_EPHEMERAL_FIRST;
	for (i = 0; i < VQ_COUNT; i++) {
		vq_init(&d->vq[i]);
		d->vq[i].owner = d;
		d->vq[i].index = i;
	}
	d->socket_path = strdup(cfg->socket_path);
	if (!d->socket_path || conn_table_init(d) < 0) {
		r = -ENOMEM;
		goto fail;
	}
	r = vu_listen(d);
	if (r < 0)
		goto fail;
	return d;
fail:
	conn_table_free(d);
	free(d->socket_path);
	free(d);
	errno = -r;
	return NULL;
}

void vsock_dev_free(struct vsock_dev *d)
{
	if (!d || d->freed)
		return;
	d->freed = true;
	if (d->notify_timer) {
		loop_timer_cancel(d->notify_timer);
		d->notify_timer = NULL;
	}
	vu_close_listener(d);
	/* drop the frontend without the transport-reset notes: every conn is
	 * told synchronously just below */
	if (d->fd >= 0) {
		unsigned i;
		loop_watch_del(d->watch);
		d->watch = NULL;
		close(d->fd);
		d->fd = -1;
		for (i = 0; i < d->in.nfds; i++)
			if (d->in.fds[i] >= 0)
				close(d->in.fds[i]);
		d->in.nfds = 0;
		for (i = 0; i < VQ_COUNT; i++) {
			loop_watch_del(d->vq[i].kick_watch);
			d->vq[i].kick_watch = NULL;
			vq_reset(&d->vq[i]);
		}
		vu_mem_clear(&d->mem);
	}
	conn_detach_all(d);
	if (d->busy == 0)
		dev_final_free(d);
}

int vsock_dev_ready(const struct vsock_dev *d)
{
	return d && !d->freed && dev_rings_ready(d);
}
