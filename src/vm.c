#include "config.h"

#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>

#include "capsafs.h"
#include "ctl.h"
#include "fs.h"
#include "log.h"
#include "loop.h"
#include "node.h"
#include "qemu.h"
#include "util.h"
#include "vm.h"
#include "vmvsock.h"

static const char *const state_names[] = {
	[VM_STOPPED] = "stopped",   [VM_STARTING] = "starting", [VM_RUNNING] = "running",
	[VM_STOPPING] = "stopping", [VM_CRASHED] = "crashed",
};

const char *vm_state_name(enum vm_state s)
{
	return state_names[s];
}

bool vm_is_active(const struct vm *vm)
{
	return vm->state == VM_STARTING || vm->state == VM_RUNNING || vm->state == VM_STOPPING;
}

bool vm_name_valid(const char *name)
{
	size_t n = strlen(name), i;

	if (n == 0 || n > VM_NAME_MAX || name[0] == '.' || name[0] == '-')
		return false;
	for (i = 0; i < n; i++) {
		char c = name[i];
		if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
		      c == '-' || c == '_' || c == '.'))
			return false;
	}
	return true;
}

struct vm *vm_find(const char *name)
{
	struct vm *vm;

	for (vm = cfs.vms; vm; vm = vm->next)
		if (strcmp(vm->name, name) == 0)
			return vm;
	return NULL;
}

bool vm_cid_taken(uint32_t cid, const struct vm *except)
{
	struct vm *vm;

	for (vm = cfs.vms; vm; vm = vm->next)
		if (vm != except && vm->cid == cid)
			return true;
	return false;
}

uint32_t vm_cid_alloc(void)
{
	uint32_t cid = 3;

	while (vm_cid_taken(cid, NULL))
		cid++;
	return cid;
}

int vm_fail(struct vm *vm, int err, const char *fmt, ...)
{
	va_list ap;
	char *nl;

	va_start(ap, fmt);
	vsnprintf(vm->error, sizeof(vm->error), fmt, ap);
	va_end(ap);
	while ((nl = strchr(vm->error, '\n')))
		*nl = ' ';
	log_info("%s: %s", vm->name, vm->error);
	return -err;
}

int vm_create(const char *name, uid_t uid, gid_t gid, struct vm **out)
{
	__do_free struct vm *vm = NULL;

	if (!vm_name_valid(name))
		return -EINVAL;
	if (vm_find(name))
		return -EEXIST;
	vm = calloc(1, sizeof(*vm));
	if (!vm)
		return -ENOMEM;
	snprintf(vm->name, sizeof(vm->name), "%s", name);
	vm->uid = uid;
	vm->gid = gid;
	clock_gettime(CLOCK_REALTIME, &vm->ctime);
	vm->mtime = vm->ctime;
	vm->cmdline = strdup("console=ttyS0");
	vm->cpus = 1;
	vm->memory_mib = 512;
	vm->cid = vm_cid_alloc();
	vm->refs = 1; /* the registry's */
	if (!vm->cmdline || console_init(&vm->con, CONSOLE_RING_SIZE) < 0) {
		free(vm->cmdline);
		return -ENOMEM;
	}
	if (vmvsock_init(vm) < 0) {
		console_fini(&vm->con);
		free(vm->cmdline);
		return -ENOMEM;
	}
	vm->next = cfs.vms;
	cfs.vms = vm;
	*out = move_ptr(vm);
	return 0;
}

void vm_get(struct vm *vm)
{
	vm->refs++;
}

void vm_put(struct vm *vm)
{
	if (--vm->refs > 0)
		return;
	vmvsock_fini(vm);
	console_fini(&vm->con);
	free(vm->kernel);
	free(vm->initrd);
	free(vm->cmdline);
	free(vm);
}

int vm_remove(struct vm *vm)
{
	struct vm **pp;

	if (vm_is_active(vm))
		return vm_fail(vm, EBUSY, "cannot remove %s: it is %s", vm->name,
			       vm_state_name(vm->state));
	for (pp = &cfs.vms; *pp; pp = &(*pp)->next) {
		if (*pp == vm) {
			*pp = vm->next;
			break;
		}
	}
	vm->removed = true;
	vmvsock_remove(vm);
	/* readers blocked on the console of a removed VM would wait forever */
	plist_fail_all(&vm->console_readers, ENODEV);
	node_vm_removed(vm);
	vm_put(vm);
	return 0;
}

void vm_notify_pollers(struct vm *vm)
{
	fs_notify_pollers(vm);
}

void vm_state_set(struct vm *vm, enum vm_state s)
{
	if (vm->state == s)
		return;
	log_info("%s: %s -> %s", vm->name, vm_state_name(vm->state), vm_state_name(s));
	vm->state = s;
	vm->state_gen++;
	vm_notify_pollers(vm);
}

static void reply_all_written(struct plist *list)
{
	while (!plist_empty(list)) {
		struct pending *p = list->head;
		size_t size = p->size;
		fuse_reply_write(pending_take(p), size);
	}
}

/* ---- console ---- */

void vm_console_output(struct vm *vm, const char *data, size_t len)
{
	console_append(&vm->con, data, len);
	fs_console_wakeup(vm);
}

/* ---- launching ---- */

static int vm_open_image(struct vm *vm, const char *what, const char *path,
			 const struct cred *who)
{
	int fd = cred_open_read(who, path);

	if (fd < 0)
		return vm_fail(vm, -fd, "cannot open %s '%s': %s", what, path, strerror(-fd));
	return fd;
}

static void vm_start_failed(struct vm *vm, int err)
{
	vm_state_set(vm, VM_STOPPED);
	plist_fail_all(&vm->start_waiters, err);
	plist_fail_all(&vm->restart_waiters, err);
}

/* Loop thread: the fork must happen here, so PR_SET_PDEATHSIG follows the
 * loop thread (which lives as long as the daemon) and not a FUSE worker that
 * may exit when idle. */
static void vm_launch(void *arg)
{
	struct vm *vm = arg;
	__do_close int kfd = -1;
	__do_close int ifd = -1;
	struct cred self;
	const char *kernel, *initrd;
	int r;

	if (vm->removed || vm->state != VM_STARTING || vm->proc)
		goto out;
	cred_self(&self);
	kernel = vm->kernel ? vm->kernel : cfs.kernel;
	initrd = vm->kernel ? vm->initrd : (vm->initrd ? vm->initrd : cfs.initrd);
	kfd = vm_open_image(vm, "kernel", kernel, vm->kernel ? &vm->kernel_cred : &self);
	if (kfd < 0) {
		vm_start_failed(vm, -kfd);
		goto out;
	}
	if (initrd && *initrd) {
		ifd = vm_open_image(vm, "initrd", initrd, vm->initrd ? &vm->initrd_cred : &self);
		if (ifd < 0) {
			vm_start_failed(vm, -ifd);
			goto out;
		}
	}
	r = vmvsock_prepare(vm);
	if (r < 0) {
		vm_start_failed(vm, -r);
		goto out;
	}
	console_boot(&vm->con);
	r = qemu_spawn(vm, kfd, ifd, vmvsock_dirfd(vm));
	if (r < 0) {
		vmvsock_stopped(vm);
		vm_start_failed(vm, -r);
		goto out;
	}
out:
	vm_put(vm);
}

static int vm_begin_start(struct vm *vm)
{
	char bin[4096];
	int r;

	if (vm_is_active(vm))
		return vm_fail(vm, EBUSY, "%s is already %s", vm->name, vm_state_name(vm->state));
	if (!vm->kernel && !cfs.kernel)
		return vm_fail(vm, ENOENT, "no kernel: write a kernel image path to 'kernel'");
	r = qemu_find(cfs.qemu, bin, sizeof(bin));
	if (r < 0)
		return vm_fail(vm, -r, "qemu binary '%s' not found: %s", cfs.qemu, strerror(-r));
	vm->error[0] = '\0';
	vm->stopping = STOP_NONE;
	vm_state_set(vm, VM_STARTING);
	vm_get(vm);
	loop_call(cfs.loop, vm_launch, vm);
	return 0;
}

void vm_qemu_ready(struct vm *vm)
{
	if (vm->state != VM_STARTING)
		return;
	vm_state_set(vm, VM_RUNNING);
	reply_all_written(&vm->start_waiters);
	reply_all_written(&vm->restart_waiters);
}

void vm_guest_shutdown(struct vm *vm, const char *reason)
{
	log_info("%s: guest shut down (%s)", vm->name, reason ? reason : "no reason given");
	/* QEMU runs with -no-reboot, so a reset ends it like a power-off: say
	 * so, since a guest that resets unasked (a triple fault, a kernel that
	 * does not fit in memory) would otherwise just look stopped */
	if (reason && strcmp(reason, "guest-reset") == 0 && vm->stopping == STOP_NONE)
		vm_fail(vm, 0, "the guest reset itself (a reboot, a triple fault or a kernel "
			       "that could not start); QEMU runs with -no-reboot, so the VM stopped");
	else if (reason && strcmp(reason, "guest-panic") == 0)
		vm_fail(vm, 0, "the guest kernel panicked");
}

static void vm_kill_timer(void *arg);

void vm_qemu_exited(struct vm *vm, int status, const char *stderr_tail)
{
	bool asked = vm->stopping != STOP_NONE;
	bool clean = WIFEXITED(status) && WEXITSTATUS(status) == 0;
	bool was_starting = vm->state == VM_STARTING;
	char tail[VM_ERROR_MAX];
	char *p;

	snprintf(tail, sizeof(tail), "%s", stderr_tail ? stderr_tail : "");
	/* keep QEMU's last line: that is where it says what went wrong */
	for (p = tail + strlen(tail); p > tail && (p[-1] == '\n' || p[-1] == '\r'); p--)
		p[-1] = '\0';
	p = strrchr(tail, '\n');
	p = p ? p + 1 : tail;

	qemu_proc_free(vm->proc);
	vm->proc = NULL;
	vmvsock_stopped(vm);
	if (vm->kill_timer) {
		loop_timer_cancel(vm->kill_timer);
		vm->kill_timer = NULL;
	}
	if (asked || (clean && !was_starting)) {
		vm_state_set(vm, VM_STOPPED);
	} else {
		if (WIFSIGNALED(status))
			vm_fail(vm, EIO, "qemu was killed by signal %d (%s)%s%s", WTERMSIG(status),
				strsignal(WTERMSIG(status)), *p ? ": " : "", p);
		else
			vm_fail(vm, EIO, "qemu exited with status %d%s%s", WEXITSTATUS(status),
				*p ? ": " : "", p);
		vm_state_set(vm, VM_CRASHED);
	}
	vm->stopping = STOP_NONE;
	if (was_starting) {
		plist_fail_all(&vm->start_waiters, EIO);
		plist_fail_all(&vm->restart_waiters, EIO);
	}
	reply_all_written(&vm->stop_waiters);
	if (vm->restart_pending) {
		int r;
		vm->restart_pending = false;
		r = vm_begin_start(vm);
		if (r < 0)
			plist_fail_all(&vm->restart_waiters, -r);
	}
}

/* ---- stopping ---- */

#define STOP_REPRESS_MS 2000

/* During the grace period the power button is pressed again every 2 s: a
 * guest still booting (or not yet listening for it) misses the first press. */
static void vm_kill_timer(void *arg)
{
	struct vm *vm = arg;
	uint64_t now = now_ms();

	vm->kill_timer = NULL;
	if (!vm->proc || vm->stopping != STOP_ACPI)
		return;
	if (now >= vm->stop_deadline) {
		log_info("%s: no power-off after %u s, killing qemu", vm->name, cfs.stop_timeout);
		vm->stopping = STOP_KILL;
		qemu_signal(vm->proc, SIGKILL);
		return;
	}
	qemu_powerdown(vm->proc);
	vm->kill_timer = loop_timer_add(cfs.loop, MIN(STOP_REPRESS_MS, vm->stop_deadline - now),
					vm_kill_timer, vm);
}

static int vm_begin_stop(struct vm *vm, bool force)
{
	if (!vm_is_active(vm) || !vm->proc)
		return vm_fail(vm, EINVAL, "%s is not running (%s)", vm->name,
			       vm_state_name(vm->state));
	if (force) {
		vm->stopping = STOP_KILL;
		vm_state_set(vm, VM_STOPPING);
		qemu_signal(vm->proc, SIGKILL);
		return 0;
	}
	if (vm->stopping != STOP_NONE)
		return 0; /* already on its way down: wait with the others */
	vm->stopping = STOP_ACPI;
	/* before QMP is up there is no way to ask nicely */
	if (vm->state == VM_STARTING || qemu_powerdown(vm->proc) < 0) {
		vm->stopping = STOP_KILL;
		vm_state_set(vm, VM_STOPPING);
		qemu_signal(vm->proc, SIGKILL);
		return 0;
	}
	vm_state_set(vm, VM_STOPPING);
	vm->stop_deadline = now_ms() + (uint64_t)cfs.stop_timeout * 1000;
	vm->kill_timer = loop_timer_add(cfs.loop, MIN(STOP_REPRESS_MS, (uint64_t)cfs.stop_timeout * 1000),
					vm_kill_timer, vm);
	return 0;
}

/* ---- the ctl file ---- */

enum { CTL_DONE = 0, CTL_PARKED = 1 };

struct ctl_ctx {
	fuse_req_t req;
	size_t size;
};

static int ctl_start(void *obj, int argc, char **argv, void *ctx)
{
	struct vm *vm = obj;
	struct ctl_ctx *c = ctx;
	int r = vm_begin_start(vm);

	if (r < 0)
		return r;
	/* the start goes on either way; without memory to wait, say so now */
	return pending_park(c->req, &vm->start_waiters, 0, c->size, NULL) ? CTL_PARKED : -ENOMEM;
}

static int ctl_stop_common(struct vm *vm, struct ctl_ctx *c, bool force)
{
	int r = vm_begin_stop(vm, force);

	if (r < 0)
		return r;
	if (!vm->proc)
		return CTL_DONE;
	return pending_park(c->req, &vm->stop_waiters, 0, c->size, NULL) ? CTL_PARKED : -ENOMEM;
}

static int ctl_stop(void *obj, int argc, char **argv, void *ctx)
{
	return ctl_stop_common(obj, ctx, false);
}

static int ctl_kill(void *obj, int argc, char **argv, void *ctx)
{
	return ctl_stop_common(obj, ctx, true);
}

static int ctl_restart(void *obj, int argc, char **argv, void *ctx)
{
	struct vm *vm = obj;
	struct ctl_ctx *c = ctx;
	int r;

	if (!vm_is_active(vm))
		return ctl_start(obj, argc, argv, ctx);
	if (vm->state == VM_STARTING)
		return vm_fail(vm, EBUSY, "%s is starting", vm->name);
	r = vm_begin_stop(vm, false);
	if (r < 0)
		return r;
	vm->restart_pending = true;
	return pending_park(c->req, &vm->restart_waiters, 0, c->size, NULL) ? CTL_PARKED : -ENOMEM;
}

static const struct ctl_cmd vm_ctl_cmds[] = {
	{ "start", 0, 0, ctl_start },
	{ "stop", 0, 0, ctl_stop },
	{ "kill", 0, 0, ctl_kill },
	{ "restart", 0, 0, ctl_restart },
};

void vm_ctl_write(struct vm *vm, fuse_req_t req, const char *buf, size_t size,
		  const struct cred *who)
{
	struct ctl_ctx c = { .req = req, .size = size };
	char err[256] = "";
	int r;

	(void)who;
	r = ctl_run(vm_ctl_cmds, ARRAY_SIZE(vm_ctl_cmds), buf, size, vm, &c, err, sizeof(err));
	if (r == CTL_PARKED)
		return;
	if (r < 0) {
		if (err[0])
			vm_fail(vm, -r, "ctl: %s", err);
		fuse_reply_err(req, -r);
		return;
	}
	fuse_reply_write(req, size);
}

/* ---- unmount ---- */

void vm_shutdown_all(void)
{
	uint64_t deadline = now_ms() + 5000;
	bool any;
	struct vm *vm;

	big_lock();
	for (vm = cfs.vms; vm; vm = vm->next) {
		if (!vm->proc)
			continue;
		vm->stopping = STOP_KILL;
		vm_state_set(vm, VM_STOPPING);
		qemu_signal(vm->proc, SIGTERM); /* QEMU exits cleanly on SIGTERM */
	}
	big_unlock();
	for (;;) {
		any = false;
		big_lock();
		for (vm = cfs.vms; vm; vm = vm->next) {
			if (!vm->proc)
				continue;
			any = true;
			if (now_ms() > deadline)
				qemu_signal(vm->proc, SIGKILL);
		}
		big_unlock();
		if (!any)
			break;
		usleep(20000);
	}
}
