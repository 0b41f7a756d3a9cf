/* Test guest: see vsock_driver.h. */
#include "config.h"

#include <errno.h>
#include <poll.h>
#include <time.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <linux/virtio_config.h>

#include "vsock/vhost_user.h"
#include "vsock_driver.h"

#define MIN_SZ(a, b) ((a) < (b) ? (a) : (b))
#define MAX_U64(a, b) ((a) > (b) ? (a) : (b))

#define RING_AREA 0x10000ull /* per ring, enough for 1024 entries */

void *vd_gpa(struct vd *v, uint64_t gpa, uint64_t len)
{
	if (gpa < VD_GPA_BASE || gpa - VD_GPA_BASE > v->ram_size ||
	    len > v->ram_size - (gpa - VD_GPA_BASE))
		return NULL;
	return v->ram + (gpa - VD_GPA_BASE);
}

static int send_fds(int sock, const void *buf, size_t len, const int *fds, unsigned nfds)
{
	union {
		char b[CMSG_SPACE(sizeof(int) * 8)];
		struct cmsghdr align;
	} cb;
	struct iovec iov = { (void *)buf, len };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
	ssize_t n;

	if (nfds) {
		struct cmsghdr *cm;
		mh.msg_control = cb.b;
		mh.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
		cm = CMSG_FIRSTHDR(&mh);
		cm->cmsg_level = SOL_SOCKET;
		cm->cmsg_type = SCM_RIGHTS;
		cm->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
		memcpy(CMSG_DATA(cm), fds, sizeof(int) * nfds);
	}
	n = sendmsg(sock, &mh, MSG_NOSIGNAL);
	if (n < 0)
		return -errno;
	return n == (ssize_t)len ? 0 : -EIO;
}

static int read_full(int fd, void *buf, size_t len)
{
	size_t off = 0;

	while (off < len) {
		struct pollfd p = { fd, POLLIN, 0 };
		ssize_t n;
		if (poll(&p, 1, 5000) != 1)
			return -ETIMEDOUT;
		n = read(fd, (char *)buf + off, len - off);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return n < 0 ? -errno : -ECONNRESET;
		off += (size_t)n;
	}
	return 0;
}

static bool req_has_reply(uint32_t req)
{
	return req == VHOST_USER_GET_FEATURES || req == VHOST_USER_GET_PROTOCOL_FEATURES ||
	       req == VHOST_USER_GET_VRING_BASE || req == VHOST_USER_GET_CONFIG ||
	       req == VHOST_USER_GET_QUEUE_NUM;
}

int vd_msg(struct vd *v, uint32_t req, uint32_t flags, const void *payload, uint32_t size,
	   const int *fds, unsigned nfds, void *reply, uint32_t reply_size)
{
	uint8_t buf[VHOST_USER_HDR_SIZE + VHOST_USER_MAX_PAYLOAD];
	struct vhost_user_hdr h = { req, VHOST_USER_VERSION | flags, size };
	struct vhost_user_hdr rh;
	int r;

	memcpy(buf, &h, sizeof(h));
	if (size)
		memcpy(buf + sizeof(h), payload, size);
	r = send_fds(v->sock, buf, sizeof(h) + size, fds, nfds);
	if (r < 0)
		return r;
	if (!req_has_reply(req) && !(flags & VHOST_USER_NEED_REPLY_MASK))
		return 0;
	r = read_full(v->sock, &rh, sizeof(rh));
	if (r < 0)
		return r;
	if (rh.request != req || !(rh.flags & VHOST_USER_REPLY_MASK) ||
	    rh.size > VHOST_USER_MAX_PAYLOAD)
		return -EPROTO;
	r = read_full(v->sock, buf, rh.size);
	if (r < 0)
		return r;
	memcpy(reply, buf, MIN_SZ(rh.size, reply_size));
	return (int)rh.size;
}

static int msg_u64(struct vd *v, uint32_t req, uint64_t val)
{
	return vd_msg(v, req, 0, &val, sizeof(val), NULL, 0, NULL, 0);
}

static int get_u64(struct vd *v, uint32_t req, uint64_t *out)
{
	int r = vd_msg(v, req, 0, NULL, 0, NULL, 0, out, sizeof(*out));
	return r == 8 ? 0 : (r < 0 ? r : -EPROTO);
}

int vd_get_config_cid(struct vd *v, uint64_t *cid)
{
	struct {
		struct vhost_user_config_hdr h;
		uint64_t cid;
	} __attribute__((packed)) c = { { 0, 8, 0 }, 0 }, rep;
	int r = vd_msg(v, VHOST_USER_GET_CONFIG, 0, &c, sizeof(c), NULL, 0, &rep, sizeof(rep));

	if (r != (int)sizeof(rep))
		return r < 0 ? r : -EPROTO;
	*cid = rep.cid;
	return 0;
}

static void ring_layout(struct vd *v, struct vd_ring *r, uint64_t area_gpa)
{
	uint8_t *p = vd_gpa(v, area_gpa, RING_AREA);
	unsigned i;

	r->desc = (struct vring_desc *)p;
	r->avail = (struct vring_avail *)(p + 16 * r->num);
	r->used = (struct vring_used *)(p + ((16 * r->num + 6 + 2 * r->num + 4095) & ~4095u));
	r->free_head = 0;
	r->nfree = r->num;
	for (i = 0; i < r->num; i++)
		r->desc[i].next = (uint16_t)(i + 1);
	r->chain = calloc(r->num, sizeof(*r->chain));
	r->chain_ids = calloc(r->num, sizeof(*r->chain_ids));
	r->kickfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	r->callfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
}

static int ring_setup_msgs(struct vd *v, struct vd_ring *r, unsigned idx)
{
	struct vhost_user_vring_state st = { idx, r->num };
	struct vhost_user_vring_addr a = {
		.index = idx,
		.desc_user_addr = (uintptr_t)r->desc,
		.used_user_addr = (uintptr_t)r->used,
		.avail_user_addr = (uintptr_t)r->avail,
	};
	uint64_t u = idx;
	int rr;

	if ((rr = vd_msg(v, VHOST_USER_SET_VRING_NUM, 0, &st, sizeof(st), NULL, 0, NULL, 0)) < 0)
		return rr;
	st.num = 0;
	if ((rr = vd_msg(v, VHOST_USER_SET_VRING_BASE, 0, &st, sizeof(st), NULL, 0, NULL, 0)) < 0)
		return rr;
	if ((rr = vd_msg(v, VHOST_USER_SET_VRING_ADDR, 0, &a, sizeof(a), NULL, 0, NULL, 0)) < 0)
		return rr;
	if ((rr = vd_msg(v, VHOST_USER_SET_VRING_KICK, 0, &u, 8, &r->kickfd, 1, NULL, 0)) < 0)
		return rr;
	if ((rr = vd_msg(v, VHOST_USER_SET_VRING_CALL, 0, &u, 8, &r->callfd, 1, NULL, 0)) < 0)
		return rr;
	return 0;
}

/* Nothing open: every fd -1, every pointer NULL. */
static void vd_clear(struct vd *v)
{
	memset(v, 0, sizeof(*v));
	v->sock = v->memfd = -1;
	v->rx.kickfd = v->rx.callfd = v->tx.kickfd = v->tx.callfd = -1;
}

int vd_open(struct vd *v, const char *path, const struct vd_opts *o)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	struct {
		uint32_t n, pad;
		struct {
			uint64_t gpa, size, uva, off;
		} r[2];
	} mt;
	uint64_t feat, pf, want;
	int fds[2], r;
	unsigned slot_rx, slot_tx;
	uint64_t need;

	vd_clear(v);
	v->o = *o;
	if (!v->o.qsize)
		v->o.qsize = 128;
	if (!v->o.rx_buf_size)
		v->o.rx_buf_size = 4096;
	slot_rx = (v->o.rx_buf_size + 63) & ~63u;
	slot_tx = 65536 + 4096; /* payload + header + indirect table */
	/* region 0: rings, rx slots, scratch; region 1: tx slots */
	need = 2 * RING_AREA + (uint64_t)v->o.qsize * slot_rx + (1 << 20);
	/* region 1 starts with 64 KiB kept free for VD_STRADDLE packets */
	need = MAX_U64(need, (uint64_t)v->o.qsize * slot_tx + 65536);
	v->half = (need + 0xfffff) & ~0xfffffull;
	v->ram_size = 2 * v->half;
	v->rx.num = v->tx.num = v->o.qsize;

	v->memfd = memfd_create("vsock-test-ram", MFD_CLOEXEC);
	if (v->memfd < 0 || ftruncate(v->memfd, (off_t)v->ram_size) < 0)
		return -errno;
	v->ram = mmap(NULL, v->ram_size, PROT_READ | PROT_WRITE, MAP_SHARED, v->memfd, 0);
	if (v->ram == MAP_FAILED)
		return -errno;
	ring_layout(v, &v->rx, VD_GPA_BASE);
	ring_layout(v, &v->tx, VD_GPA_BASE + RING_AREA);
	v->rx.slot_gpa = VD_GPA_BASE + 2 * RING_AREA;
	v->rx.slot_size = slot_rx;
	v->scratch_gpa = v->rx.slot_gpa + (uint64_t)v->o.qsize * slot_rx;
	v->tx.slot_gpa = VD_GPA_BASE + v->half + 65536;
	v->tx.slot_size = slot_tx;

	v->sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
	if (v->sock < 0 || connect(v->sock, (struct sockaddr *)&sa, sizeof(sa)) < 0)
		return -errno;

	/* The order QEMU 7.2 uses. */
	if ((r = get_u64(v, VHOST_USER_GET_FEATURES, &feat)) < 0)
		return r;
	if (!(feat & (1ull << VHOST_USER_F_PROTOCOL_FEATURES)))
		return -EPROTO;
	if ((r = get_u64(v, VHOST_USER_GET_PROTOCOL_FEATURES, &pf)) < 0)
		return r;
	if (!(pf & (1ull << VHOST_USER_PROTOCOL_F_CONFIG)))
		return -EPROTO;
	v->protocol_features = (1ull << VHOST_USER_PROTOCOL_F_CONFIG);
	if (o->reply_ack)
		v->protocol_features |= pf & (1ull << VHOST_USER_PROTOCOL_F_REPLY_ACK);
	if ((r = msg_u64(v, VHOST_USER_SET_PROTOCOL_FEATURES, v->protocol_features)) < 0)
		return r;
	if ((r = vd_msg(v, VHOST_USER_SET_OWNER, 0, NULL, 0, NULL, 0, NULL, 0)) < 0)
		return r;
	if ((r = get_u64(v, VHOST_USER_GET_FEATURES, &feat)) < 0)
		return r;
	if ((r = vd_get_config_cid(v, &v->cid)) < 0)
		return r;
	want = (1ull << VIRTIO_F_VERSION_1) | (1ull << VHOST_USER_F_PROTOCOL_FEATURES);
	if (o->event_idx)
		want |= 1ull << VIRTIO_RING_F_EVENT_IDX;
	if (o->indirect)
		want |= 1ull << VIRTIO_RING_F_INDIRECT_DESC;
	v->features = want & feat;
	if ((r = msg_u64(v, VHOST_USER_SET_FEATURES, v->features)) < 0)
		return r;

	memset(&mt, 0, sizeof(mt));
	mt.n = 2;
	mt.r[0].gpa = VD_GPA_BASE;
	mt.r[0].size = v->half;
	mt.r[0].uva = (uintptr_t)v->ram;
	mt.r[0].off = 0;
	mt.r[1].gpa = VD_GPA_BASE + v->half;
	mt.r[1].size = v->half;
	mt.r[1].uva = (uintptr_t)v->ram + v->half;
	mt.r[1].off = v->half;
	fds[0] = fds[1] = v->memfd;
	if (v->protocol_features & (1ull << VHOST_USER_PROTOCOL_F_REPLY_ACK)) {
		uint64_t ack = 1;
		r = vd_msg(v, VHOST_USER_SET_MEM_TABLE, VHOST_USER_NEED_REPLY_MASK, &mt, sizeof(mt),
			   fds, 2, &ack, sizeof(ack));
		if (r < 0)
			return r;
		if (ack != 0)
			return -EPROTO;
	} else if ((r = vd_msg(v, VHOST_USER_SET_MEM_TABLE, 0, &mt, sizeof(mt), fds, 2, NULL,
			       0)) < 0) {
		return r;
	}
	if ((r = ring_setup_msgs(v, &v->rx, 0)) < 0 || (r = ring_setup_msgs(v, &v->tx, 1)) < 0)
		return r;
	for (unsigned i = 0; i < 2; i++) {
		struct vhost_user_vring_state st = { i, 1 };
		if ((r = vd_msg(v, VHOST_USER_SET_VRING_ENABLE, 0, &st, sizeof(st), NULL, 0, NULL,
				0)) < 0)
			return r;
	}
	vd_post_rx(v);
	return 0;
}

void vd_close(struct vd *v)
{
	struct vd_ring *rs[2] = { &v->rx, &v->tx };

	if (v->sock >= 0)
		close(v->sock);
	v->sock = -1;
	for (unsigned i = 0; i < 2; i++) {
		if (rs[i]->kickfd >= 0)
			close(rs[i]->kickfd);
		if (rs[i]->callfd >= 0)
			close(rs[i]->callfd);
		free(rs[i]->chain);
		free(rs[i]->chain_ids);
	}
	if (v->ram && v->ram != MAP_FAILED)
		munmap(v->ram, v->ram_size);
	if (v->memfd >= 0)
		close(v->memfd);
	while (v->qlen) {
		free(v->q[v->qhead].data);
		v->qhead = (v->qhead + 1) % v->qcap;
		v->qlen--;
	}
	free(v->q);
	vd_clear(v); /* closed: a second vd_close does nothing */
}

static bool has_event_idx(const struct vd *v)
{
	return v->features & (1ull << VIRTIO_RING_F_EVENT_IDX);
}

static void ring_kick(struct vd *v, struct vd_ring *r, uint16_t old)
{
	uint64_t one = 1;

	/* full barrier: avail->idx store before reading the device's wishes */
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	if (has_event_idx(v)) {
		uint16_t ev = __atomic_load_n((uint16_t *)&r->used->ring[r->num], __ATOMIC_RELAXED);
		if (!vring_need_event(ev, r->avail_idx, old))
			return;
	} else if (__atomic_load_n(&r->used->flags, __ATOMIC_RELAXED) & VRING_USED_F_NO_NOTIFY) {
		return;
	}
	if (write(r->kickfd, &one, 8) < 0)
		perror("kick");
}

static int desc_alloc(struct vd_ring *r, unsigned n, uint16_t *ids)
{
	unsigned i;

	if (r->nfree < n || n > 64)
		return -ENOSPC;
	for (i = 0; i < n; i++) {
		ids[i] = r->free_head;
		r->free_head = r->desc[ids[i]].next;
	}
	r->nfree -= n;
	memcpy(r->chain_ids[ids[0]], ids, n * sizeof(uint16_t));
	r->chain[ids[0]] = (uint16_t)n;
	return 0;
}

static void desc_free(struct vd_ring *r, uint16_t head)
{
	unsigned i, n = r->chain[head];

	for (i = 0; i < n; i++) {
		uint16_t id = r->chain_ids[head][i];
		r->desc[id].next = r->free_head;
		r->free_head = id;
	}
	r->nfree += n;
	r->chain[head] = 0;
}

static void avail_add(struct vd_ring *r, uint16_t head)
{
	r->avail->ring[r->avail_idx % r->num] = head;
	r->avail_idx++;
	__atomic_store_n(&r->avail->idx, r->avail_idx, __ATOMIC_RELEASE);
}

static void set_desc(struct vring_desc *d, uint64_t addr, uint32_t len, uint16_t flags,
		     uint16_t next)
{
	d->addr = addr;
	d->len = len;
	d->flags = flags;
	d->next = next;
}

void vd_post_rx(struct vd *v)
{
	struct vd_ring *r = &v->rx;
	uint16_t old = r->avail_idx;
	uint16_t ids[2];

	while (r->nfree >= (v->o.rx_split ? 2u : 1u)) {
		unsigned n = v->o.rx_split ? 2 : 1;
		uint64_t gpa;

		desc_alloc(r, n, ids);
		/* the head's slot is this buffer's memory */
		gpa = r->slot_gpa + (uint64_t)ids[0] * r->slot_size;
		if (n == 1) {
			set_desc(&r->desc[ids[0]], gpa, v->o.rx_buf_size, VRING_DESC_F_WRITE, 0);
		} else {
			/* split inside the header: the device must scatter it */
			set_desc(&r->desc[ids[0]], gpa, 20, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
				 ids[1]);
			set_desc(&r->desc[ids[1]], gpa + 20, v->o.rx_buf_size - 20,
				 VRING_DESC_F_WRITE, 0);
		}
		avail_add(r, ids[0]);
	}
	if (r->avail_idx != old)
		ring_kick(v, r, old);
}

void vd_hdr(struct vd *v, struct virtio_vsock_hdr *h, uint32_t src_port, uint32_t dst_port,
	    uint16_t op, uint32_t len, uint32_t buf_alloc, uint32_t fwd_cnt)
{
	memset(h, 0, sizeof(*h));
	h->src_cid = v->cid;
	h->dst_cid = 2;
	h->src_port = src_port;
	h->dst_port = dst_port;
	h->len = len;
	h->type = VIRTIO_VSOCK_TYPE_STREAM;
	h->op = op;
	h->buf_alloc = buf_alloc;
	h->fwd_cnt = fwd_cnt;
}

static void reap_tx(struct vd *v)
{
	struct vd_ring *r = &v->tx;
	uint16_t idx = __atomic_load_n(&r->used->idx, __ATOMIC_ACQUIRE);

	while (r->last_used != idx) {
		struct vring_used_elem e = r->used->ring[r->last_used % r->num];
		if (e.id < r->num && r->chain[e.id])
			desc_free(r, (uint16_t)e.id);
		else
			fprintf(stderr, "vsock_driver: bogus tx used id %u\n", e.id);
		r->last_used++;
	}
	if (has_event_idx(v))
		__atomic_store_n((uint16_t *)&r->avail->ring[r->num], r->last_used,
				 __ATOMIC_RELEASE);
}

static void q_push(struct vd *v, const struct vd_pkt *p)
{
	if (v->qlen == v->qcap) {
		unsigned ncap = v->qcap ? v->qcap * 2 : 64, i;
		struct vd_pkt *nq = malloc(ncap * sizeof(*nq));
		for (i = 0; i < v->qlen; i++)
			nq[i] = v->q[(v->qhead + i) % v->qcap];
		free(v->q);
		v->q = nq;
		v->qcap = ncap;
		v->qhead = 0;
	}
	v->q[(v->qhead + v->qlen++) % v->qcap] = *p;
}

static int reap_rx(struct vd *v)
{
	struct vd_ring *r = &v->rx;
	uint16_t idx = __atomic_load_n(&r->used->idx, __ATOMIC_ACQUIRE);
	int got = 0;

	while (r->last_used != idx) {
		struct vring_used_elem e = r->used->ring[r->last_used % r->num];
		r->last_used++;
		if (e.id >= r->num || !r->chain[e.id]) {
			fprintf(stderr, "vsock_driver: bogus rx used id %u\n", e.id);
			continue;
		}
		if (e.len >= VD_HDR && e.len <= v->o.rx_buf_size) {
			uint8_t *buf = vd_gpa(v, r->slot_gpa + (uint64_t)e.id * r->slot_size,
					      e.len);
			struct vd_pkt p;
			memcpy(&p.hdr, buf, VD_HDR);
			p.len = e.len - VD_HDR;
			if (p.hdr.len != p.len)
				fprintf(stderr, "vsock_driver: rx len %u but header says %u\n",
					p.len, p.hdr.len);
			p.data = malloc(p.len ? p.len : 1);
			memcpy(p.data, buf + VD_HDR, p.len);
			q_push(v, &p);
			v->rx_count++;
			got++;
		} else if (e.len) {
			fprintf(stderr, "vsock_driver: rx used len %u out of range\n", e.len);
		}
		desc_free(r, (uint16_t)e.id);
	}
	if (has_event_idx(v))
		__atomic_store_n((uint16_t *)&r->avail->ring[r->num], r->last_used,
				 __ATOMIC_RELEASE);
	return got;
}

int vd_poll(struct vd *v, int timeout_ms)
{
	struct pollfd p[2] = { { v->rx.callfd, POLLIN, 0 }, { v->tx.callfd, POLLIN, 0 } };
	uint64_t x;
	int got;

	reap_tx(v);
	got = reap_rx(v);
	if (got) {
		vd_post_rx(v);
		return got;
	}
	/* used_event was just updated: re-check before sleeping */
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	if (timeout_ms <= 0) {
		/* no sleep: the call eventfds are left set (a later sleep
		 * returns at once and clears them), which saves two syscalls
		 * per call for drivers that spin */
	} else {
		if (__atomic_load_n(&v->rx.used->idx, __ATOMIC_ACQUIRE) == v->rx.last_used)
			poll(p, 2, timeout_ms);
		if (read(v->rx.callfd, &x, 8) < 0) {
		}
		if (read(v->tx.callfd, &x, 8) < 0) {
		}
	}
	reap_tx(v);
	got = reap_rx(v);
	if (got)
		vd_post_rx(v);
	return got;
}

int vd_recv(struct vd *v, struct vd_pkt *pkt, int timeout_ms)
{
	struct timespec t0, t;

	clock_gettime(CLOCK_MONOTONIC, &t0);
	if (!v->qlen)
		vd_poll(v, 0);
	while (!v->qlen) {
		long el;
		clock_gettime(CLOCK_MONOTONIC, &t);
		el = (t.tv_sec - t0.tv_sec) * 1000 + (t.tv_nsec - t0.tv_nsec) / 1000000;
		if (el >= timeout_ms)
			return -ETIMEDOUT;
		vd_poll(v, (int)MIN_SZ(timeout_ms - el, 10));
	}
	*pkt = v->q[v->qhead];
	v->qhead = (v->qhead + 1) % v->qcap;
	v->qlen--;
	return 0;
}

unsigned vd_tx_inflight(const struct vd *v)
{
	return v->tx.num - v->tx.nfree;
}

static int tx_wait(struct vd *v, unsigned n)
{
	int i;

	for (i = 0; i < 2000 && v->tx.nfree < n; i++) {
		struct pollfd p = { v->tx.callfd, POLLIN, 0 };
		uint64_t x;
		reap_tx(v);
		if (v->tx.nfree >= n)
			break;
		poll(&p, 1, 1);
		if (read(v->tx.callfd, &x, 8) < 0) {
		}
		/* keep rx moving too: the device may wait for rx to answer */
		if (reap_rx(v))
			vd_post_rx(v);
	}
	return v->tx.nfree >= n ? 0 : -ETIMEDOUT;
}

int vd_send(struct vd *v, const struct virtio_vsock_hdr *h, const void *payload, uint32_t len,
	    enum vd_layout layout)
{
	struct vd_ring *r = &v->tx;
	uint16_t ids[64], old = r->avail_idx;
	unsigned n, i;
	uint64_t gpa;
	uint8_t *buf;

	if (len > 65536)
		return -EINVAL;
	switch (layout) {
	case VD_ONE:
	case VD_INDIRECT:
	case VD_STRADDLE:
		n = 1;
		break;
	case VD_HDR_PAYLOAD:
		n = len ? 2 : 1;
		break;
	case VD_SPLIT_HDR:
		n = len ? 3 : 2;
		break;
	case VD_SCATTER:
		n = 1 + (len ? MIN_SZ((len + 99) / 100, 32u) : 0);
		break;
	default:
		return -EINVAL;
	}
	reap_tx(v);
	if (tx_wait(v, n) < 0)
		return -ETIMEDOUT;
	desc_alloc(r, n, ids);
	gpa = r->slot_gpa + (uint64_t)ids[0] * r->slot_size;
	if (layout == VD_STRADDLE) {
		/* put the packet so that it crosses from region 0 into region 1 */
		gpa = VD_GPA_BASE + v->half - 30;
	}
	buf = vd_gpa(v, gpa, VD_HDR + len);
	memcpy(buf, h, VD_HDR);
	if (len)
		memcpy(buf + VD_HDR, payload, len);
	switch (layout) {
	case VD_ONE:
	case VD_STRADDLE:
		set_desc(&r->desc[ids[0]], gpa, VD_HDR + len, 0, 0);
		break;
	case VD_HDR_PAYLOAD:
		set_desc(&r->desc[ids[0]], gpa, VD_HDR, len ? VRING_DESC_F_NEXT : 0, ids[1]);
		if (len)
			set_desc(&r->desc[ids[1]], gpa + VD_HDR, len, 0, 0);
		break;
	case VD_SPLIT_HDR:
		set_desc(&r->desc[ids[0]], gpa, 7, VRING_DESC_F_NEXT, ids[1]);
		set_desc(&r->desc[ids[1]], gpa + 7, VD_HDR - 7, len ? VRING_DESC_F_NEXT : 0,
			 len ? ids[2] : 0);
		if (len)
			set_desc(&r->desc[ids[2]], gpa + VD_HDR, len, 0, 0);
		break;
	case VD_SCATTER: {
		uint32_t off = 0, per = n > 1 ? (len + (n - 2)) / (n - 1) : 0;
		set_desc(&r->desc[ids[0]], gpa, VD_HDR, n > 1 ? VRING_DESC_F_NEXT : 0, ids[1]);
		for (i = 1; i < n; i++) {
			uint32_t l = MIN_SZ(per, len - off);
			set_desc(&r->desc[ids[i]], gpa + VD_HDR + off, l,
				 i + 1 < n ? VRING_DESC_F_NEXT : 0, i + 1 < n ? ids[i + 1] : 0);
			off += l;
		}
		break;
	}
	case VD_INDIRECT: {
		/* table after the packet in the same slot */
		uint64_t tgpa = gpa + 65536 + 1024;
		struct vring_desc *t = vd_gpa(v, tgpa, 3 * 16);
		unsigned tn = len ? 3 : 2;
		set_desc(&t[0], gpa, 10, VRING_DESC_F_NEXT, 1);
		set_desc(&t[1], gpa + 10, VD_HDR - 10, len ? VRING_DESC_F_NEXT : 0, 2);
		if (len)
			set_desc(&t[2], gpa + VD_HDR, len, 0, 0);
		set_desc(&r->desc[ids[0]], tgpa, tn * 16, VRING_DESC_F_INDIRECT, 0);
		break;
	}
	}
	avail_add(r, ids[0]);
	v->tx_count++;
	ring_kick(v, r, old);
	return 0;
}

int vd_raw_alloc(struct vd *v, unsigned n, uint16_t *ids)
{
	reap_tx(v);
	if (tx_wait(v, n) < 0)
		return -ETIMEDOUT;
	return desc_alloc(&v->tx, n, ids);
}

void vd_raw_post(struct vd *v, uint16_t head)
{
	uint16_t old = v->tx.avail_idx;

	avail_add(&v->tx, head);
	ring_kick(v, &v->tx, old);
}
