#include "config.h"

#include <string.h>
#include <endian.h>

#include "log.h"
#include "util.h"
#include "vsock/vring.h"

void vq_init(struct vq *vr)
{
	memset(vr, 0, sizeof(*vr));
	vr->kickfd = vr->callfd = vr->errfd = -1;
}

void vq_reset(struct vq *vr)
{
	if (vr->kickfd >= 0)
		close(vr->kickfd);
	if (vr->callfd >= 0)
		close(vr->callfd);
	if (vr->errfd >= 0)
		close(vr->errfd);
	vq_init(vr);
}

int vq_map(struct vq *vr, const struct vu_mem *m)
{
	uint64_t n = vr->num;

	vr->desc = NULL;
	vr->avail = NULL;
	vr->used = NULL;
	if (!vr->addr_set || n == 0)
		return -EINVAL;
	/* Sizes include the event-idx words after avail->ring / used->ring. */
	vr->desc = vu_mem_uva_to_host(m, vr->desc_uva, 16 * n);
	vr->avail = vu_mem_uva_to_host(m, vr->avail_uva, 6 + 2 * n);
	vr->used = vu_mem_uva_to_host(m, vr->used_uva, 6 + 8 * n);
	if (!vr->desc || !vr->avail || !vr->used || ((uintptr_t)vr->desc & 15) ||
	    ((uintptr_t)vr->avail & 1) || ((uintptr_t)vr->used & 3)) {
		vr->desc = NULL;
		vr->avail = NULL;
		vr->used = NULL;
		return -EFAULT;
	}
	if (!vr->used_synced) {
		/* The guest's view of where the used ring stands: fresh rings
		 * are 0, a ring restarted after GET_VRING_BASE is where we left
		 * it. */
		vr->used_idx = le16toh(__atomic_load_n(&vr->used->idx, __ATOMIC_ACQUIRE));
		vr->used_synced = true;
		vr->signalled_valid = false;
	}
	return 0;
}

bool vq_ready(const struct vq *vr)
{
	return vr->num && vr->desc && vr->started && vr->enabled && !vr->broken;
}

static inline uint16_t avail_idx(const struct vq *vr)
{
	return le16toh(__atomic_load_n(&vr->avail->idx, __ATOMIC_ACQUIRE));
}

bool vq_has_avail(const struct vq *vr)
{
	return vq_ready(vr) && avail_idx(vr) != vr->last_avail;
}

static void vq_set_broken(struct vq *vr, const char *why)
{
	if (!vr->broken)
		log_warn("vsock: guest corrupted a virtqueue (%s); ignoring it until reset", why);
	vr->broken = true;
}

static inline void desc_read(const struct vring_desc *table, unsigned i, struct vring_desc *d)
{
	/* One copy: the guest may rewrite the descriptor while we look at it. */
	memcpy(d, &table[i], sizeof(*d));
	d->addr = le64toh(d->addr);
	d->len = le32toh(d->len);
	d->flags = le16toh(d->flags);
	d->next = le16toh(d->next);
}

/* Walk one chain into ch.  Returns 0, -EINVAL (malformed), -ENOSPC (iov pool
 * too small). */
static int chain_walk(struct vq *vr, const struct vu_mem *m, struct vring_chain *ch,
		      unsigned max)
{
	const struct vring_desc *table = vr->desc;
	unsigned tsize = vr->num, in_table = 0, total = 0, i = ch->head;
	bool indirect = false;
	struct vring_desc d;
	int n;

	for (;;) {
		if (i >= tsize)
			return -EINVAL;
		/* More descriptors than the table holds means a loop. */
		if (++in_table > tsize || ++total > VRING_MAX_CHAIN)
			return -EINVAL;
		desc_read(table, i, &d);
		if (d.flags & VRING_DESC_F_INDIRECT) {
			if (indirect || !vr->indirect || (d.flags & VRING_DESC_F_NEXT) ||
			    d.len == 0 || d.len % sizeof(struct vring_desc) ||
			    d.len / sizeof(struct vring_desc) > VRING_MAX_CHAIN)
				return -EINVAL;
			table = vu_mem_gpa_to_host(m, d.addr, d.len);
			if (!table)
				return -EINVAL;
			tsize = d.len / sizeof(struct vring_desc);
			indirect = true;
			in_table = 0;
			i = 0;
			continue;
		}
		if (d.flags & VRING_DESC_F_WRITE) {
			n = vu_mem_gpa_to_iov(m, d.addr, d.len, ch->iov + ch->nout + ch->nin,
					      max - ch->nout - ch->nin);
			if (n < 0)
				goto bad_iov;
			ch->nin += (unsigned)n;
			ch->in_len += d.len;
		} else {
			/* The spec orders device-readable before writable. */
			if (ch->nin)
				return -EINVAL;
			n = vu_mem_gpa_to_iov(m, d.addr, d.len, ch->iov + ch->nout,
					      max - ch->nout);
			if (n < 0)
				goto bad_iov;
			ch->nout += (unsigned)n;
			ch->out_len += d.len;
		}
		if (!(d.flags & VRING_DESC_F_NEXT))
			return 0;
		i = d.next;
	}
bad_iov:
	/* Running out of a small pool is the caller's limit, not the guest's
	 * fault, unless even the full-size pool would not do. */
	if (n == -ENOSPC && max < VRING_MAX_IOV)
		return -ENOSPC;
	return -EINVAL;
}

int vq_pop(struct vq *vr, const struct vu_mem *m, struct vring_chain *ch,
	      struct iovec *iov, unsigned max)
{
	uint16_t idx, head;
	int r;

	if (!vq_ready(vr))
		return 0;
	idx = avail_idx(vr);
	if (idx == vr->last_avail)
		return 0;
	if ((uint16_t)(idx - vr->last_avail) > vr->num) {
		vq_set_broken(vr, "avail index ran ahead");
		return -EIO;
	}
	/* avail_idx() was an acquire load: the entry below is at least as new. */
	head = le16toh(__atomic_load_n(&vr->avail->ring[vr->last_avail % vr->num],
				       __ATOMIC_RELAXED));
	if (head >= vr->num) {
		vq_set_broken(vr, "head index out of range");
		return -EIO;
	}
	vr->last_avail++;
	memset(ch, 0, sizeof(*ch));
	ch->head = head;
	ch->iov = iov;
	r = chain_walk(vr, m, ch, max);
	if (r == 0)
		return 1;
	if (r == -ENOSPC) {
		vr->last_avail--;
		return -ENOSPC;
	}
	vr->bad_chains++;
	log_debug("vsock: malformed descriptor chain %u dropped", head);
	vq_push(vr, head, 0);
	return -EINVAL;
}

void vq_unpop(struct vq *vr, unsigned n)
{
	vr->last_avail -= (uint16_t)n;
}

void vq_push(struct vq *vr, uint16_t head, uint32_t len)
{
	struct vring_used_elem *e = &vr->used->ring[vr->used_idx % vr->num];

	e->id = htole32(head);
	e->len = htole32(len);
	vr->used_idx++;
	/* Release: the element (and the data we wrote into the buffer) must be
	 * visible before the index that publishes it. */
	__atomic_store_n(&vr->used->idx, htole16(vr->used_idx), __ATOMIC_RELEASE);
	vr->pending_signal = true;
}

void vq_notify(struct vq *vr)
{
	uint16_t old, new_idx, event;
	bool valid;
	uint64_t one = 1;

	if (!vr->pending_signal || !vr->used)
		return;
	vr->pending_signal = false;
	/* Full barrier: used->idx store before reading the guest's wishes. */
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	if (vr->event_idx) {
		old = vr->signalled_used;
		valid = vr->signalled_valid;
		new_idx = vr->signalled_used = vr->used_idx;
		vr->signalled_valid = true;
		event = le16toh(__atomic_load_n(&vr->avail->ring[vr->num], __ATOMIC_RELAXED));
		if (valid && !vring_need_event(event, new_idx, old))
			return;
	} else if (le16toh(__atomic_load_n(&vr->avail->flags, __ATOMIC_RELAXED)) &
		   VRING_AVAIL_F_NO_INTERRUPT) {
		return;
	}
	if (vr->callfd >= 0 && write(vr->callfd, &one, sizeof(one)) < 0 && errno != EAGAIN)
		log_debug("vsock: call eventfd: %s", strerror(errno));
}

bool vq_empty_arm(struct vq *vr)
{
	uint16_t *avail_event;

	if (!vq_ready(vr))
		return true;
	if (avail_idx(vr) != vr->last_avail)
		return false;
	if (!vr->event_idx)
		return true;
	avail_event = (uint16_t *)&vr->used->ring[vr->num];
	__atomic_store_n(avail_event, htole16(vr->last_avail), __ATOMIC_RELAXED);
	/* The guest may have added a buffer before seeing avail_event. */
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	return avail_idx(vr) == vr->last_avail;
}

/* Copy between buf and the bytes of iov from offset off, either way. */
static size_t iov_copy(const struct iovec *iov, unsigned n, size_t off, void *buf, size_t len,
		       bool into_iov)
{
	size_t done = 0;
	unsigned i;

	for (i = 0; i < n && done < len; i++) {
		size_t seg = iov[i].iov_len, c;
		char *p;
		if (off >= seg) {
			off -= seg;
			continue;
		}
		p = (char *)iov[i].iov_base + off;
		c = MIN(seg - off, len - done);
		if (into_iov)
			memcpy(p, (char *)buf + done, c);
		else
			memcpy((char *)buf + done, p, c);
		done += c;
		off = 0;
	}
	return done;
}

size_t iov_to_buf(const struct iovec *iov, unsigned n, size_t off, void *buf, size_t len)
{
	return iov_copy(iov, n, off, buf, len, false);
}

size_t iov_from_buf(const struct iovec *iov, unsigned n, size_t off, const void *buf,
		    size_t len)
{
	return iov_copy(iov, n, off, (void *)buf, len, true);
}

unsigned iov_slice(const struct iovec *iov, unsigned n, size_t off, size_t len,
		   struct iovec *out, unsigned max)
{
	unsigned i, k = 0;

	for (i = 0; i < n && len > 0 && k < max; i++) {
		size_t seg = iov[i].iov_len, c;
		if (off >= seg) {
			off -= seg;
			continue;
		}
		c = MIN(seg - off, len);
		out[k].iov_base = (char *)iov[i].iov_base + off;
		out[k].iov_len = c;
		k++;
		len -= c;
		off = 0;
	}
	return k;
}
