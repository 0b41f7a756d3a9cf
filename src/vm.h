/* The VM object: configuration, state machine, and the runtime of its QEMU. */
#ifndef CAPSAFS_VM_H
#define CAPSAFS_VM_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <time.h>

#include "console.h"
#include "cred.h"
#include "pending.h"

enum vm_state { VM_STOPPED, VM_STARTING, VM_RUNNING, VM_STOPPING, VM_CRASHED };

#define VM_NAME_MAX 64
#define VM_ERROR_MAX 512

struct qemu_proc;
struct node;
struct handle;
struct loop_timer;
struct vmvsock;

struct vm {
	char name[VM_NAME_MAX + 1];
	uid_t uid;
	gid_t gid;
	struct timespec ctime, mtime;
	unsigned refs;
	bool removed;
	struct vm *next;

	/* configuration */
	char *kernel, *initrd, *cmdline;
	struct cred kernel_cred, initrd_cred; /* who named the files */
	unsigned cpus;
	uint64_t memory_mib;
	uint32_t cid;

	enum vm_state state;
	uint64_t state_gen; /* bumped at each state change, for poll */
	char error[VM_ERROR_MAX];
	struct console con;

	struct qemu_proc *proc; /* NULL when no QEMU runs */
	enum { STOP_NONE, STOP_ACPI, STOP_KILL } stopping;
	bool restart_pending;
	struct loop_timer *kill_timer; /* re-press / kill during a stop */
	uint64_t stop_deadline;        /* ms: kill after this */

	struct plist start_waiters; /* ctl writes waiting for running */
	struct plist stop_waiters;  /* ctl writes waiting for stopped */
	struct plist restart_waiters; /* restart writes: answered once running again */
	struct plist console_readers;
	struct handle *pollers; /* open files with a poll handle */

	struct node *nodes; /* this VM's inodes */
	struct vmvsock *vsock; /* declared ports, device, exported sockets */
};

/* Registry */
struct vm *vm_find(const char *name);
int vm_create(const char *name, uid_t uid, gid_t gid, struct vm **out);
/* rmdir: -EBUSY unless stopped/crashed. */
int vm_remove(struct vm *vm);
void vm_get(struct vm *vm);
void vm_put(struct vm *vm);
bool vm_name_valid(const char *name);

/* Errors: printf into vm->error (one line) and return -err. */
int vm_fail(struct vm *vm, int err, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

bool vm_is_active(const struct vm *vm); /* starting, running or stopping */
const char *vm_state_name(enum vm_state s);
void vm_state_set(struct vm *vm, enum vm_state s);
void vm_notify_pollers(struct vm *vm);

/* ctl commands: answer req (a write of size bytes) now or later. */
void vm_ctl_write(struct vm *vm, fuse_req_t req, const char *buf, size_t size,
		  const struct cred *who);

/* Unmount: stop every VM (SIGTERM, then SIGKILL after a grace), wait. */
void vm_shutdown_all(void);

/* Called by qemu.c from the loop thread. */
void vm_console_output(struct vm *vm, const char *data, size_t len);
void vm_qemu_ready(struct vm *vm);
void vm_qemu_exited(struct vm *vm, int status, const char *stderr_tail);
/* QMP's SHUTDOWN event with its reason ("guest-shutdown", "guest-reset", ...). */
void vm_guest_shutdown(struct vm *vm, const char *reason);

uint32_t vm_cid_alloc(void);
bool vm_cid_taken(uint32_t cid, const struct vm *except);

#endif
