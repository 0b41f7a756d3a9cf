/* See fuzz_frontend.h. */
#include "config.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <linux/virtio_config.h>
#include <linux/virtio_ring.h>

#include "log.h"
#include "vsock/memory.h"
#include "fuzz_frontend.h"

void fe_global_init(struct fe *fe)
{
	unsigned i;

	memset(fe, 0, sizeof(*fe));
	log_verbosity = getenv("FUZZ_VERBOSE") ? LOG_DEBUG : LOG_ERR;
	big_lock(); /* held for good: this thread is the loop thread */
	fe->loop = loop_new();
	fe->memfd = memfd_create("fuzz-guest-ram", MFD_CLOEXEC);
	if (!fe->loop || fe->memfd < 0 || ftruncate(fe->memfd, FE_RAM_SIZE) < 0)
		abort();
	fe->ram = mmap(NULL, FE_RAM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fe->memfd, 0);
	if (fe->ram == MAP_FAILED)
		abort();
	for (i = 0; i < 2; i++) {
		fe->kick[i] = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
		fe->call[i] = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	}
	snprintf(fe->path, sizeof(fe->path), "/tmp/capsafs-fuzz-%d.sock", (int)getpid());
	fe->sock = -1;
}

void fe_pump(struct fe *fe)
{
	char buf[8192];
	int i;

	for (i = 0; i < 64; i++) {
		bool more = false;
		if (loop_run_once(fe->loop, 0) > 0)
			more = true;
		while (fe->sock >= 0) {
			ssize_t n = recv(fe->sock, buf, sizeof(buf), MSG_DONTWAIT);
			if (n > 0)
				continue;
			if (n == 0) { /* the device dropped us */
				close(fe->sock);
				fe->sock = -1;
			}
			break;
		}
		if (!more)
			break;
	}
}

void fe_start(struct fe *fe, vsock_accept_fn accept, void *arg)
{
	struct vsock_dev_config cfg = {
		.guest_cid = FE_GUEST_CID,
		.socket_path = fe->path,
		.max_conns = 64,
		.accept = accept,
		.accept_arg = arg,
	};
	struct sockaddr_un sa = { .sun_family = AF_UNIX };

	fe->dev = vsock_dev_new(fe->loop, &cfg);
	if (!fe->dev)
		abort();
	fe->sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	strcpy(sa.sun_path, fe->path);
	if (fe->sock < 0 || connect(fe->sock, (struct sockaddr *)&sa, sizeof(sa)) < 0)
		abort();
	fe_pump(fe); /* accept */
}

void fe_stop(struct fe *fe)
{
	if (fe->sock >= 0)
		close(fe->sock);
	fe->sock = -1;
	fe_pump(fe); /* the device sees the hangup: transport reset */
	vsock_dev_free(fe->dev);
	fe->dev = NULL;
	fe_pump(fe); /* frees the dead watches */
}

bool fe_send_raw(struct fe *fe, const void *buf, size_t len, const int *fds, unsigned nfds)
{
	union {
		char b[CMSG_SPACE(sizeof(int) * 16)];
		struct cmsghdr align;
	} cb;
	struct iovec iov = { (void *)buf, len };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
	size_t off = 0;

	if (fe->sock < 0)
		return false;
	if (nfds > 16)
		nfds = 16;
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
	while (off < len || (len == 0 && nfds)) {
		ssize_t n = sendmsg(fe->sock, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (n < 0 && errno == EAGAIN) {
			fe_pump(fe); /* let the device read */
			if (fe->sock < 0)
				return false;
			continue;
		}
		if (n < 0)
			return false;
		if (len == 0)
			break;
		off += (size_t)n;
		iov.iov_base = (char *)buf + off;
		iov.iov_len = len - off;
		mh.msg_control = NULL; /* the fds went with the first bytes */
		mh.msg_controllen = 0;
	}
	return true;
}

/* fe_setup sends its whole sequence before letting the device read it. */
static bool batching;

bool fe_msg(struct fe *fe, uint32_t req, uint32_t flags, const void *payload, uint32_t size,
	    const int *fds, unsigned nfds)
{
	uint8_t buf[VHOST_USER_HDR_SIZE + VHOST_USER_MAX_PAYLOAD];
	struct vhost_user_hdr h = { req, VHOST_USER_VERSION | flags, size };

	if (size > VHOST_USER_MAX_PAYLOAD)
		return false;
	memcpy(buf, &h, sizeof(h));
	if (size)
		memcpy(buf + sizeof(h), payload, size);
	if (!fe_send_raw(fe, buf, sizeof(h) + size, fds, nfds))
		return false;
	if (!batching)
		fe_pump(fe);
	return fe->sock >= 0;
}

void fe_setup(struct fe *fe, uint64_t features, unsigned num, const uint64_t ring_off[2][3])
{
	struct {
		uint32_t n, pad;
		struct vu_mem_region_desc r[2];
	} mt = { 2, 0, { { FE_GPA_BASE, FE_RAM_SIZE / 2, 0, 0 },
			 { FE_GPA_BASE + FE_RAM_SIZE / 2, FE_RAM_SIZE / 2, 0, FE_RAM_SIZE / 2 } } };
	int fds[2] = { fe->memfd, fe->memfd };
	uint64_t pf = 1ull << VHOST_USER_PROTOCOL_F_CONFIG;
	unsigned i;

	batching = true;
	mt.r[0].userspace_addr = (uintptr_t)fe->ram;
	mt.r[1].userspace_addr = (uintptr_t)fe->ram + FE_RAM_SIZE / 2;
	fe_msg(fe, VHOST_USER_SET_PROTOCOL_FEATURES, 0, &pf, 8, NULL, 0);
	fe_msg(fe, VHOST_USER_SET_OWNER, 0, NULL, 0, NULL, 0);
	fe_msg(fe, VHOST_USER_SET_FEATURES, 0, &features, 8, NULL, 0);
	fe_msg(fe, VHOST_USER_SET_MEM_TABLE, 0, &mt, sizeof(mt), fds, 2);
	for (i = 0; i < 2; i++) {
		struct vhost_user_vring_state st = { i, num };
		struct vhost_user_vring_addr a = {
			.index = i,
			.desc_user_addr = (uintptr_t)fe->ram + ring_off[i][0],
			.avail_user_addr = (uintptr_t)fe->ram + ring_off[i][1],
			.used_user_addr = (uintptr_t)fe->ram + ring_off[i][2],
		};
		uint64_t u = i;
		fe_msg(fe, VHOST_USER_SET_VRING_NUM, 0, &st, sizeof(st), NULL, 0);
		st.num = 0;
		fe_msg(fe, VHOST_USER_SET_VRING_BASE, 0, &st, sizeof(st), NULL, 0);
		fe_msg(fe, VHOST_USER_SET_VRING_ADDR, 0, &a, sizeof(a), NULL, 0);
		fe_msg(fe, VHOST_USER_SET_VRING_CALL, 0, &u, 8, &fe->call[i], 1);
		fe_msg(fe, VHOST_USER_SET_VRING_KICK, 0, &u, 8, &fe->kick[i], 1);
	}
	for (i = 0; i < 2; i++) {
		struct vhost_user_vring_state st = { i, 1 };
		fe_msg(fe, VHOST_USER_SET_VRING_ENABLE, 0, &st, sizeof(st), NULL, 0);
	}
	batching = false;
	fe_pump(fe);
}

void fe_kick(struct fe *fe, unsigned idx)
{
	uint64_t one = 1, v;

	if (write(fe->kick[idx & 1], &one, 8) < 0)
		abort();
	fe_pump(fe);
	/* the device may not be watching it (ring stopped): do not carry it over */
	if (read(fe->kick[idx & 1], &v, 8) < 0 && errno != EAGAIN)
		abort();
	(void)read(fe->call[0], &v, 8);
	(void)read(fe->call[1], &v, 8);
}

int fe_lowest_free_fd(void)
{
	int fd = dup(0);

	close(fd);
	return fd;
}

void fe_check_fds(int lowest)
{
	int now = fe_lowest_free_fd();

	if (now != lowest) {
		fprintf(stderr, "file descriptor leak: lowest free fd %d, was %d\n", now, lowest);
		abort();
	}
}
