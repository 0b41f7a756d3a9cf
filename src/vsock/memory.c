#include "config.h"

#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include "log.h"
#include "util.h"
#include "vsock/memory.h"

static void region_unmap(struct vu_mem_region *r)
{
	if (r->map)
		munmap(r->map, r->map_len);
	memset(r, 0, sizeof(*r));
}

void vu_mem_clear(struct vu_mem *m)
{
	unsigned i;

	for (i = 0; i < m->n; i++)
		region_unmap(&m->r[i]);
	m->n = 0;
}

/* Map one region.  The frontend (QEMU) is trusted to hand us sane fds, but we
 * still refuse sizes that overflow or exceed the file, since touching a
 * mapping beyond EOF raises SIGBUS in the daemon. */
static int region_map(struct vu_mem_region *r, const struct vu_mem_region_desc *d, int fd)
{
	struct stat st;
	uint64_t end;
	void *p;

	if (d->memory_size == 0 || d->guest_phys_addr + d->memory_size < d->guest_phys_addr ||
	    d->userspace_addr + d->memory_size < d->userspace_addr)
		return -EINVAL;
	end = d->mmap_offset + d->memory_size;
	if (end < d->mmap_offset || end > SIZE_MAX)
		return -EINVAL;
	if (fstat(fd, &st) < 0)
		return -errno;
	if (S_ISREG(st.st_mode) && (uint64_t)st.st_size < end)
		return -EINVAL;
	/* Map from offset 0 so mmap_offset need not be page aligned. */
	p = mmap(NULL, (size_t)end, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, 0);
	if (p == MAP_FAILED)
		return -errno;
	r->gpa = d->guest_phys_addr;
	r->size = d->memory_size;
	r->uva = d->userspace_addr;
	r->map = p;
	r->map_len = (size_t)end;
	r->host = (uint8_t *)p + d->mmap_offset;
	return 0;
}

int vu_mem_set(struct vu_mem *m, const struct vu_mem_region_desc *d, unsigned n, const int *fds)
{
	struct vu_mem next = { 0 };
	unsigned i;
	int r = 0;

	if (n > VU_MEM_MAX_REGIONS)
		r = -EINVAL;
	for (i = 0; i < n && r == 0; i++) {
		r = region_map(&next.r[i], &d[i], fds[i]);
		if (r == 0)
			next.n = i + 1;
		else
			log_warn("vhost-user: cannot map memory region %u: %s", i, strerror(-r));
	}
	for (i = 0; i < n; i++)
		if (fds[i] >= 0)
			close(fds[i]);
	if (r < 0) {
		vu_mem_clear(&next);
		return r;
	}
	vu_mem_clear(m);
	*m = next;
	return 0;
}

/* [a, a+len) inside [base, base+size)?  Written so that no sum can wrap. */
static inline bool range_inside(uint64_t a, uint64_t len, uint64_t base, uint64_t size)
{
	return a >= base && a - base < size && len <= size - (a - base);
}

void *vu_mem_uva_to_host(const struct vu_mem *m, uint64_t uva, uint64_t len)
{
	unsigned i;

	for (i = 0; i < m->n; i++) {
		const struct vu_mem_region *r = &m->r[i];
		if (range_inside(uva, len, r->uva, r->size))
			return r->host + (uva - r->uva);
	}
	return NULL;
}

void *vu_mem_gpa_to_host(const struct vu_mem *m, uint64_t gpa, uint64_t len)
{
	unsigned i;

	for (i = 0; i < m->n; i++) {
		const struct vu_mem_region *r = &m->r[i];
		if (range_inside(gpa, len, r->gpa, r->size))
			return r->host + (gpa - r->gpa);
	}
	return NULL;
}

int vu_mem_gpa_to_iov(const struct vu_mem *m, uint64_t gpa, uint64_t len, struct iovec *iov,
		      unsigned max)
{
	unsigned n = 0, i;

	while (len > 0) {
		const struct vu_mem_region *r = NULL;
		uint64_t off, seg;

		for (i = 0; i < m->n; i++) {
			if (gpa >= m->r[i].gpa && gpa - m->r[i].gpa < m->r[i].size) {
				r = &m->r[i];
				break;
			}
		}
		if (!r)
			return -EFAULT;
		if (n == max)
			return -ENOSPC;
		off = gpa - r->gpa;
		seg = MIN(len, r->size - off);
		iov[n].iov_base = r->host + off;
		iov[n].iov_len = (size_t)seg;
		n++;
		len -= seg;
		/* gpa + seg cannot wrap: seg ends inside a region that did not wrap */
		gpa += seg;
	}
	return (int)n;
}
