/* Guest memory as the vhost-user frontend describes it: a table of regions,
 * each an fd we mmap, known by guest-physical address (what descriptors carry)
 * and by the frontend's own virtual address (what SET_VRING_ADDR carries).
 *
 * Every translation is overflow-safe: the guest picks addresses and lengths,
 * so a range is only handed out when all of it lies inside mapped memory. */
#ifndef CAPSAFS_VSOCK_MEMORY_H
#define CAPSAFS_VSOCK_MEMORY_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

/* VHOST_MEMORY_BASELINE_NREGIONS: what SET_MEM_TABLE can carry. */
#define VU_MEM_MAX_REGIONS 8

struct vu_mem_region_desc {
	uint64_t guest_phys_addr;
	uint64_t memory_size;
	uint64_t userspace_addr;
	uint64_t mmap_offset;
};

struct vu_mem_region {
	uint64_t gpa;   /* guest-physical start */
	uint64_t size;  /* bytes */
	uint64_t uva;   /* frontend virtual start */
	uint8_t *host;  /* our mapping of gpa */
	void *map;      /* what mmap returned (covers mmap_offset too) */
	size_t map_len;
};

struct vu_mem {
	unsigned n;
	struct vu_mem_region r[VU_MEM_MAX_REGIONS];
};

/* Replace the table: maps every fd (they are always closed, mapped or not).
 * On failure the old table stays in place and -errno is returned. */
int vu_mem_set(struct vu_mem *m, const struct vu_mem_region_desc *d, unsigned n, const int *fds);
void vu_mem_clear(struct vu_mem *m);

/* Host pointer for [uva, uva+len) of the frontend's address space, or NULL
 * unless it lies inside one region.  Used for the ring areas. */
void *vu_mem_uva_to_host(const struct vu_mem *m, uint64_t uva, uint64_t len);
/* Same for guest-physical addresses (indirect descriptor tables). */
void *vu_mem_gpa_to_host(const struct vu_mem *m, uint64_t gpa, uint64_t len);
/* Scatter [gpa, gpa+len) into up to max iovecs (a buffer may straddle
 * adjacent regions).  Returns the count, -EFAULT when part of the range is not
 * guest memory, -ENOSPC when max is too small. */
int vu_mem_gpa_to_iov(const struct vu_mem *m, uint64_t gpa, uint64_t len, struct iovec *iov,
		      unsigned max);

#endif
