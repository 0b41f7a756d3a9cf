/* The vhost-user backend server: one listening socket per device, one
 * frontend (QEMU) at a time.  Messages are read without blocking the loop
 * (a partial message waits in d->in), each answered as the spec asks:
 * GET_* always reply, the rest only when REPLY_ACK was negotiated and the
 * frontend set NEED_REPLY. */
#include "config.h"

#include <fcntl.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <linux/virtio_config.h>

#include "log.h"
#include "loop.h"
#include "util.h"
#include "vsock/vhost_user.h"
#include "vsock/vsock_int.h"

#define VU_FEATURES                                                                      \
	((1ull << VIRTIO_F_VERSION_1) | (1ull << VHOST_USER_F_PROTOCOL_FEATURES) |       \
	 (1ull << VIRTIO_RING_F_EVENT_IDX) | (1ull << VIRTIO_RING_F_INDIRECT_DESC))
#define VU_PROTOCOL_FEATURES                                                             \
	((1ull << VHOST_USER_PROTOCOL_F_REPLY_ACK) | (1ull << VHOST_USER_PROTOCOL_F_CONFIG))

static void vu_accept_cb(void *arg, uint32_t events);
static void vu_read_cb(void *arg, uint32_t events);

static void inbuf_drop_fds(struct vu_inbuf *in)
{
	unsigned i;

	for (i = 0; i < in->nfds; i++)
		if (in->fds[i] >= 0)
			close(in->fds[i]);
	in->nfds = 0;
	in->have = 0;
}

int vu_listen(struct vsock_dev *d)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	__do_close int fd = -1;
	struct stat st;

	if (strlen(d->socket_path) >= sizeof(sa.sun_path))
		return -ENAMETOOLONG;
	strcpy(sa.sun_path, d->socket_path);
	/* A socket left behind by a crashed daemon is replaced; anything else
	 * at that path is not ours to remove. */
	if (lstat(d->socket_path, &st) == 0) {
		if (!S_ISSOCK(st.st_mode))
			return -EEXIST;
		unlink(d->socket_path);
	}
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(fd, 4) < 0)
		return -errno;
	d->listen_watch = loop_watch_add(d->loop, fd, EPOLLIN, vu_accept_cb, d);
	if (!d->listen_watch) {
		int e = errno;
		unlink(d->socket_path);
		return -e;
	}
	d->listen_fd = move_fd(fd);
	return 0;
}

void vu_close_listener(struct vsock_dev *d)
{
	loop_watch_del(d->listen_watch);
	d->listen_watch = NULL;
	if (d->listen_fd >= 0) {
		close(d->listen_fd);
		d->listen_fd = -1;
		unlink(d->socket_path);
	}
}

static void vu_stop_ring(struct vsock_dev *d, unsigned i)
{
	struct vq *vr = &d->vq[i];

	loop_watch_del(vr->kick_watch);
	vr->kick_watch = NULL;
	if (vr->kickfd >= 0)
		close(vr->kickfd);
	vr->kickfd = -1;
	vr->started = false;
}

/* Frontend gone: forget everything it told us, reset every connection and
 * take the next frontend (a restarted QEMU). */
void vu_disconnect(struct vsock_dev *d)
{
	unsigned i;

	if (d->fd < 0)
		return;
	loop_watch_del(d->watch);
	d->watch = NULL;
	close(d->fd);
	d->fd = -1;
	inbuf_drop_fds(&d->in);
	for (i = 0; i < VQ_COUNT; i++) {
		vu_stop_ring(d, i);
		vq_reset(&d->vq[i]);
		d->vq[i].owner = d;
		d->vq[i].index = i;
	}
	vu_mem_clear(&d->mem);
	d->acked_features = 0;
	d->protocol_features = 0;
	dev_transport_reset(d, ECONNRESET);
	if (d->listen_watch)
		loop_watch_mod(d->listen_watch, EPOLLIN);
}

static void vu_accept_cb(void *arg, uint32_t events)
{
	struct vsock_dev *d = arg;
	int fd;

	dev_enter(d);
	fd = accept4(d->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
	if (fd < 0) {
		if (errno != EAGAIN && errno != EINTR)
			log_warn("vhost-user accept on %s: %s", d->socket_path, strerror(errno));
		goto out;
	}
	if (d->fd >= 0) {
		/* Not reached: we stop watching while a frontend is connected. */
		close(fd);
		goto out;
	}
	d->watch = loop_watch_add(d->loop, fd, EPOLLIN, vu_read_cb, d);
	if (!d->watch) {
		log_warn("vhost-user: cannot watch frontend: %s", strerror(errno));
		close(fd);
		goto out;
	}
	d->fd = fd;
	for (unsigned i = 0; i < VQ_COUNT; i++) {
		vq_init(&d->vq[i]);
		d->vq[i].owner = d;
		d->vq[i].index = i;
	}
	/* One frontend at a time: later ones wait in the backlog. */
	loop_watch_mod(d->listen_watch, 0);
	log_info("vhost-user frontend connected on %s", d->socket_path);
out:
	dev_leave(d);
}

static int vu_send(struct vsock_dev *d, uint32_t request, const void *payload, uint32_t size)
{
	struct vhost_user_hdr h = {
		.request = request,
		.flags = VHOST_USER_VERSION | VHOST_USER_REPLY_MASK,
		.size = size,
	};
	uint8_t buf[VHOST_USER_HDR_SIZE + VHOST_USER_MAX_PAYLOAD];
	size_t len = VHOST_USER_HDR_SIZE + size, off = 0;

	memcpy(buf, &h, sizeof(h));
	memcpy(buf + VHOST_USER_HDR_SIZE, payload, size);
	while (off < len) {
		ssize_t n = send(d->fd, buf + off, len - off, MSG_NOSIGNAL);
		if (n < 0) {
			struct pollfd p = { .fd = d->fd, .events = POLLOUT };
			if (errno == EINTR)
				continue;
			/* Replies are tiny; a full socket means a stuck frontend. */
			if (errno == EAGAIN && poll(&p, 1, 1000) == 1)
				continue;
			return -errno;
		}
		off += (size_t)n;
	}
	return 0;
}

static int vu_reply_u64(struct vsock_dev *d, uint32_t request, uint64_t v)
{
	return vu_send(d, request, &v, sizeof(v));
}

static int vring_index(struct vsock_dev *d, uint32_t index, const char *what)
{
	if (index >= VQ_COUNT) {
		log_warn("vhost-user %s: no virtqueue %u", what, index);
		return -EINVAL;
	}
	return (int)index;
}

static void vq_kick_cb(void *arg, uint32_t events);

static int vu_set_vring_fd(struct vsock_dev *d, uint32_t request, uint64_t u, int fd)
{
	int i = vring_index(d, (uint32_t)(u & VHOST_USER_VRING_IDX_MASK), "set vring fd");
	struct vq *vr;

	if (i < 0)
		return i;
	vr = &d->vq[i];
	if (u & VHOST_USER_VRING_NOFD_MASK)
		fd = -1;
	else if (fd < 0) {
		log_warn("vhost-user: vring fd message without fd");
		return -EINVAL;
	}
	switch (request) {
	case VHOST_USER_SET_VRING_KICK:
		vu_stop_ring(d, (unsigned)i);
		vr->kickfd = fd;
		if (fd >= 0) {
			vr->kick_watch = loop_watch_add(d->loop, fd, EPOLLIN, vq_kick_cb,
							(void *)&d->vq[i]);
			if (!vr->kick_watch) {
				close(fd);
				vr->kickfd = -1;
				return -errno;
			}
		} else {
			log_warn("vhost-user: ring %d without kick fd: polled on other events only", i);
		}
		/* The ring starts with its kick fd (what QEMU and every backend do). */
		vr->started = true;
		vq_map(vr, &d->mem);
		dev_rings_changed(d);
		break;
	case VHOST_USER_SET_VRING_CALL:
		if (vr->callfd >= 0)
			close(vr->callfd);
		vr->callfd = fd;
		break;
	case VHOST_USER_SET_VRING_ERR:
		if (vr->errfd >= 0)
			close(vr->errfd);
		vr->errfd = fd;
		break;
	}
	return 0;
}

static void vq_kick_cb(void *arg, uint32_t events)
{
	struct vq *vr = arg;
	struct vsock_dev *d = vr->owner;
	uint64_t v;

	if (read(vr->kickfd, &v, sizeof(v)) < 0 && errno != EAGAIN)
		log_debug("vsock: kick eventfd: %s", strerror(errno));
	dev_vq_kick(d, vr->index);
}

static int vu_get_config(struct vsock_dev *d, const uint8_t *p, uint32_t size)
{
	struct vhost_user_config_hdr ch;
	uint8_t out[sizeof(ch) + 256] = { 0 };
	uint64_t cid = htole64(d->guest_cid);

	if (size < sizeof(ch))
		return vu_send(d, VHOST_USER_GET_CONFIG, out, 0);
	memcpy(&ch, p, sizeof(ch));
	/* struct virtio_vsock_config is the 8-byte guest_cid */
	if (ch.size > 256 || ch.offset > sizeof(cid) || ch.size > sizeof(cid) - ch.offset) {
		log_warn("vhost-user GET_CONFIG offset %u size %u out of range", ch.offset,
			 ch.size);
		/* size 0 tells the frontend it failed */
		return vu_send(d, VHOST_USER_GET_CONFIG, out, 0);
	}
	memcpy(out, &ch, sizeof(ch));
	memcpy(out + sizeof(ch), (uint8_t *)&cid + ch.offset, ch.size);
	return vu_send(d, VHOST_USER_GET_CONFIG, out, (uint32_t)sizeof(ch) + ch.size);
}

static int vu_set_mem_table(struct vsock_dev *d, const uint8_t *p, uint32_t size)
{
	struct vu_mem_region_desc regs[VU_MEM_MAX_REGIONS];
	int fds[VU_MEM_MAX_REGIONS];
	uint32_t n;
	unsigned i;
	int r;

	if (size < 8)
		return -EINVAL;
	memcpy(&n, p, sizeof(n));
	if (n == 0 || n > VU_MEM_MAX_REGIONS || n != d->in.nfds ||
	    size < 8 + n * sizeof(regs[0])) {
		log_warn("vhost-user SET_MEM_TABLE: %u regions, %u fds, %u bytes", n, d->in.nfds,
			 size);
		return -EINVAL;
	}
	memcpy(regs, p + 8, n * sizeof(regs[0]));
	for (i = 0; i < n; i++) {
		fds[i] = d->in.fds[i];
		d->in.fds[i] = -1; /* vu_mem_set owns them now */
	}
	r = vu_mem_set(&d->mem, regs, n, fds);
	/* Rings are re-translated through the new table (or stop if they no
	 * longer fit). */
	for (i = 0; i < VQ_COUNT; i++)
		if (d->vq[i].addr_set)
			vq_map(&d->vq[i], &d->mem);
	dev_rings_changed(d);
	return r;
}

static const char *vu_request_name(uint32_t r)
{
	static const char *const names[] = {
		[VHOST_USER_GET_FEATURES] = "GET_FEATURES",
		[VHOST_USER_SET_FEATURES] = "SET_FEATURES",
		[VHOST_USER_SET_OWNER] = "SET_OWNER",
		[VHOST_USER_RESET_OWNER] = "RESET_OWNER",
		[VHOST_USER_SET_MEM_TABLE] = "SET_MEM_TABLE",
		[VHOST_USER_SET_LOG_BASE] = "SET_LOG_BASE",
		[VHOST_USER_SET_LOG_FD] = "SET_LOG_FD",
		[VHOST_USER_SET_VRING_NUM] = "SET_VRING_NUM",
		[VHOST_USER_SET_VRING_ADDR] = "SET_VRING_ADDR",
		[VHOST_USER_SET_VRING_BASE] = "SET_VRING_BASE",
		[VHOST_USER_GET_VRING_BASE] = "GET_VRING_BASE",
		[VHOST_USER_SET_VRING_KICK] = "SET_VRING_KICK",
		[VHOST_USER_SET_VRING_CALL] = "SET_VRING_CALL",
		[VHOST_USER_SET_VRING_ERR] = "SET_VRING_ERR",
		[VHOST_USER_GET_PROTOCOL_FEATURES] = "GET_PROTOCOL_FEATURES",
		[VHOST_USER_SET_PROTOCOL_FEATURES] = "SET_PROTOCOL_FEATURES",
		[VHOST_USER_GET_QUEUE_NUM] = "GET_QUEUE_NUM",
		[VHOST_USER_SET_VRING_ENABLE] = "SET_VRING_ENABLE",
		[VHOST_USER_GET_CONFIG] = "GET_CONFIG",
		[VHOST_USER_SET_CONFIG] = "SET_CONFIG",
	};
	if (r < ARRAY_SIZE(names) && names[r])
		return names[r];
	return "?";
}

/* Handle one complete message.  Returns <0 when the frontend must be dropped
 * (protocol violation or a reply that could not be sent). */
static int vu_dispatch(struct vsock_dev *d)
{
	struct vhost_user_hdr h;
	const uint8_t *p = d->in.buf + VHOST_USER_HDR_SIZE;
	struct vhost_user_vring_state st;
	struct vhost_user_vring_addr va;
	uint64_t u = 0;
	int fd0 = d->in.nfds ? d->in.fds[0] : -1;
	int r = 0, i;
	bool replied = false;

	memcpy(&h, d->in.buf, sizeof(h));
	log_debug("vhost-user %s (%u) size %u fds %u", vu_request_name(h.request), h.request,
		  h.size, d->in.nfds);
	if (h.size >= sizeof(u))
		memcpy(&u, p, sizeof(u));
	if (h.size >= sizeof(st))
		memcpy(&st, p, sizeof(st));

	switch (h.request) {
	case VHOST_USER_GET_FEATURES:
		r = vu_reply_u64(d, h.request, VU_FEATURES);
		replied = true;
		break;
	case VHOST_USER_SET_FEATURES:
		if (h.size < sizeof(u))
			goto short_msg;
		d->acked_features = u & VU_FEATURES;
		for (i = 0; i < VQ_COUNT; i++) {
			d->vq[i].event_idx = u & (1ull << VIRTIO_RING_F_EVENT_IDX);
			d->vq[i].indirect = u & (1ull << VIRTIO_RING_F_INDIRECT_DESC);
			/* Without protocol features rings need no SET_VRING_ENABLE. */
			if (!(u & (1ull << VHOST_USER_F_PROTOCOL_FEATURES)))
				d->vq[i].enabled = true;
		}
		dev_rings_changed(d);
		break;
	case VHOST_USER_GET_PROTOCOL_FEATURES:
		r = vu_reply_u64(d, h.request, VU_PROTOCOL_FEATURES);
		replied = true;
		break;
	case VHOST_USER_SET_PROTOCOL_FEATURES:
		if (h.size < sizeof(u))
			goto short_msg;
		d->protocol_features = u & VU_PROTOCOL_FEATURES;
		break;
	case VHOST_USER_SET_OWNER:
	case VHOST_USER_RESET_OWNER: /* deprecated; nothing to own */
		break;
	case VHOST_USER_GET_QUEUE_NUM:
		r = vu_reply_u64(d, h.request, VQ_COUNT);
		replied = true;
		break;
	case VHOST_USER_GET_CONFIG:
		r = vu_get_config(d, p, h.size);
		replied = true;
		break;
	case VHOST_USER_SET_CONFIG:
		/* The vsock config space (guest_cid) is read-only. */
		break;
	case VHOST_USER_SET_MEM_TABLE:
		r = vu_set_mem_table(d, p, h.size);
		break;
	case VHOST_USER_SET_VRING_NUM:
		if (h.size < sizeof(st))
			goto short_msg;
		if ((i = vring_index(d, st.index, "SET_VRING_NUM")) < 0) {
			r = i;
			break;
		}
		if (st.num == 0 || st.num > VRING_MAX_NUM || (st.num & (st.num - 1))) {
			log_warn("vhost-user: bad ring size %u", st.num);
			r = -EINVAL;
			break;
		}
		d->vq[i].num = st.num;
		if (d->vq[i].addr_set)
			vq_map(&d->vq[i], &d->mem);
		break;
	case VHOST_USER_SET_VRING_ADDR:
		if (h.size < sizeof(va))
			goto short_msg;
		memcpy(&va, p, sizeof(va));
		if ((i = vring_index(d, va.index, "SET_VRING_ADDR")) < 0) {
			r = i;
			break;
		}
		d->vq[i].desc_uva = va.desc_user_addr;
		d->vq[i].avail_uva = va.avail_user_addr;
		d->vq[i].used_uva = va.used_user_addr;
		d->vq[i].addr_set = true;
		d->vq[i].used_synced = false;
		d->vq[i].broken = false;
		r = vq_map(&d->vq[i], &d->mem);
		if (r < 0)
			log_warn("vhost-user: ring %d addresses are not in guest memory", i);
		dev_rings_changed(d);
		break;
	case VHOST_USER_SET_VRING_BASE:
		if (h.size < sizeof(st))
			goto short_msg;
		if ((i = vring_index(d, st.index, "SET_VRING_BASE")) < 0) {
			r = i;
			break;
		}
		d->vq[i].last_avail = (uint16_t)st.num;
		d->vq[i].broken = false;
		break;
	case VHOST_USER_GET_VRING_BASE:
		if (h.size < sizeof(st))
			goto short_msg;
		if ((i = vring_index(d, st.index, "GET_VRING_BASE")) < 0)
			return -EPROTO; /* a reply is owed and we cannot give one */
		vu_stop_ring(d, (unsigned)i);
		st.num = d->vq[i].last_avail;
		r = vu_send(d, h.request, &st, sizeof(st));
		replied = true;
		/* A stopped ring means the guest driver was reset (or the VM
		 * stopped): its sockets are gone. */
		dev_rings_changed(d);
		break;
	case VHOST_USER_SET_VRING_KICK:
	case VHOST_USER_SET_VRING_CALL:
	case VHOST_USER_SET_VRING_ERR:
		if (h.size < sizeof(u))
			goto short_msg;
		if (!(u & VHOST_USER_VRING_NOFD_MASK) && fd0 >= 0)
			d->in.fds[0] = -1; /* handed over */
		r = vu_set_vring_fd(d, h.request, u, fd0);
		break;
	case VHOST_USER_SET_VRING_ENABLE:
		if (h.size < sizeof(st))
			goto short_msg;
		if ((i = vring_index(d, st.index, "SET_VRING_ENABLE")) < 0) {
			r = i;
			break;
		}
		d->vq[i].enabled = st.num != 0;
		dev_rings_changed(d);
		break;
	case VHOST_USER_SET_VRING_ENDIAN:
		/* Only legacy devices need this; we are VERSION_1 (little endian). */
		break;
	default:
		log_warn("vhost-user: ignoring unsupported request %u", h.request);
		r = -ENOSYS;
		break;
	}
	inbuf_drop_fds(&d->in);
	if (replied)
		return r < 0 ? r : 0;
	if ((h.flags & VHOST_USER_NEED_REPLY_MASK) &&
	    (d->protocol_features & (1ull << VHOST_USER_PROTOCOL_F_REPLY_ACK)))
		return vu_reply_u64(d, h.request, r < 0 ? 1 : 0);
	return 0;

short_msg:
	log_warn("vhost-user %s: payload of %u bytes is too short", vu_request_name(h.request),
		 h.size);
	inbuf_drop_fds(&d->in);
	return -EPROTO;
}

/* Read what the socket has; dispatch complete messages.  Returns <0 when the
 * frontend is gone or broke the protocol. */
static int vu_read_some(struct vsock_dev *d)
{
	struct vu_inbuf *in = &d->in;
	union {
		char buf[CMSG_SPACE(sizeof(int) * VU_MEM_MAX_REGIONS)];
		struct cmsghdr align;
	} cbuf;

	for (;;) {
		struct vhost_user_hdr h;
		size_t want = VHOST_USER_HDR_SIZE;
		struct iovec iov;
		struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
		struct cmsghdr *cm;
		ssize_t n;

		if (in->have >= VHOST_USER_HDR_SIZE) {
			memcpy(&h, in->buf, sizeof(h));
			if (h.size > VHOST_USER_MAX_PAYLOAD) {
				log_warn("vhost-user: message %u of %u bytes is too large",
					 h.request, h.size);
				return -EPROTO;
			}
			want += h.size;
		}
		if (in->have == want) {
			int r = vu_dispatch(d);
			if (r < 0)
				return r;
			if (d->fd < 0)
				return -ECONNRESET;
			continue;
		}
		iov.iov_base = in->buf + in->have;
		iov.iov_len = want - in->have;
		mh.msg_control = cbuf.buf;
		mh.msg_controllen = sizeof(cbuf.buf);
		n = recvmsg(d->fd, &mh, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return errno == EAGAIN ? 0 : -errno;
		}
		for (cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm)) {
			unsigned k, cnt;
			int *fds = (int *)CMSG_DATA(cm);
			if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
				continue;
			cnt = (unsigned)((cm->cmsg_len - CMSG_LEN(0)) / sizeof(int));
			for (k = 0; k < cnt; k++) {
				if (in->nfds < VU_MEM_MAX_REGIONS)
					in->fds[in->nfds++] = fds[k];
				else
					close(fds[k]);
			}
		}
		if (mh.msg_flags & MSG_CTRUNC)
			log_warn("vhost-user: file descriptors truncated");
		if (n == 0)
			return -ECONNRESET;
		in->have += (size_t)n;
	}
}

static void vu_read_cb(void *arg, uint32_t events)
{
	struct vsock_dev *d = arg;
	int r;

	dev_enter(d);
	r = vu_read_some(d);
	if (r == 0 && (events & (EPOLLHUP | EPOLLERR)) && !(events & EPOLLIN))
		r = -ECONNRESET;
	if (r < 0 && d->fd >= 0) {
		if (r == -ECONNRESET)
			log_info("vhost-user frontend on %s disconnected", d->socket_path);
		else
			log_warn("vhost-user frontend on %s dropped: %s", d->socket_path,
				 strerror(-r));
		vu_disconnect(d);
	}
	dev_leave(d);
}
