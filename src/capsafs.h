/* The daemon's global state: options and what every part shares. */
#ifndef CAPSAFS_CAPSAFS_H
#define CAPSAFS_CAPSAFS_H

#include <stdint.h>
#include <sys/types.h>
#include <time.h>

struct loop;
struct vm;
struct fuse_session;

enum accel_mode { ACCEL_AUTO, ACCEL_KVM, ACCEL_TCG };
enum vsock_backend { VSOCK_USER, VSOCK_KERNEL };

#define CAPSAFS_STOP_TIMEOUT_DEFAULT 30 /* seconds of grace for ACPI stop */

struct capsafs {
	/* options */
	char *mountpoint;
	char *sockdir;
	char *qemu;
	char *kernel;
	char *initrd;
	enum accel_mode accel;
	enum vsock_backend vsock;
	unsigned stop_timeout;

	/* resolved at start */
	const char *accel_name; /* "kvm" or "tcg" */
	uint64_t host_ram_mib;
	uid_t uid; /* the mounting user */
	gid_t gid;

	/* the root directory (mode changeable by its owner) */
	mode_t root_mode;
	struct timespec mount_time;

	struct loop *loop;
	struct fuse_session *se;
	struct vm *vms;
};

extern struct capsafs cfs;

#endif
