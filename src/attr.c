#include "config.h"

#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "attr.h"
#include "capsafs.h"
#include "cred.h"
#include "qemu.h"
#include "util.h"
#include "vm.h"

static int attr_check_stopped(struct vm *vm, const char *what)
{
	if (vm_is_active(vm))
		return vm_fail(vm, EBUSY, "cannot change %s while %s is %s", what, vm->name,
			       vm_state_name(vm->state));
	return 0;
}

static void vm_touch(struct vm *vm)
{
	clock_gettime(CLOCK_REALTIME, &vm->mtime);
}

/* kernel / initrd: an absolute path the writer can read. */
static int store_path(struct vm *vm, const char *what, const char *val, size_t len,
		      const struct cred *who, bool empty_ok, char **slot, struct cred *cslot)
{
	__do_free char *path = dup_value(val, len);
	__do_close int fd = -1;
	int r = attr_check_stopped(vm, what);

	if (r < 0)
		return r;
	if (!path)
		return vm_fail(vm, errno, "%s: one path on one line, please", what);
	if (!*path) {
		if (!empty_ok)
			return vm_fail(vm, EINVAL, "%s: empty path", what);
	} else {
		if (path[0] != '/')
			return vm_fail(vm, EINVAL, "%s: '%s' is not an absolute path", what, path);
		fd = cred_open_read(who, path);
		if (fd == -EINVAL)
			return vm_fail(vm, EINVAL, "%s: '%s' is not a regular file", what, path);
		if (fd < 0)
			return vm_fail(vm, -fd, "%s: cannot read '%s': %s", what, path,
				       strerror(-fd));
	}
	free(*slot);
	*slot = move_ptr(path);
	*cslot = *who;
	vm_touch(vm);
	return 0;
}

static int store_kernel(struct vm *vm, const char *val, size_t len, const struct cred *who)
{
	return store_path(vm, "kernel", val, len, who, false, &vm->kernel, &vm->kernel_cred);
}

static int store_initrd(struct vm *vm, const char *val, size_t len, const struct cred *who)
{
	return store_path(vm, "initrd", val, len, who, true, &vm->initrd, &vm->initrd_cred);
}

static size_t show_kernel(struct vm *vm, char *buf, size_t len)
{
	const char *k = vm->kernel ? vm->kernel : cfs.kernel;

	return (size_t)snprintf(buf, len, "%s\n", k ? k : "");
}

static size_t show_initrd(struct vm *vm, char *buf, size_t len)
{
	const char *i = vm->kernel ? vm->initrd : (vm->initrd ? vm->initrd : cfs.initrd);

	return (size_t)snprintf(buf, len, "%s\n", i ? i : "");
}

static int store_cmdline(struct vm *vm, const char *val, size_t len, const struct cred *who)
{
	__do_free char *v = dup_value(val, len);
	int r = attr_check_stopped(vm, "cmdline");

	if (r < 0)
		return r;
	if (!v)
		return vm_fail(vm, errno, "cmdline: one line without NUL bytes, please");
	free(vm->cmdline);
	vm->cmdline = move_ptr(v);
	vm_touch(vm);
	return 0;
}

static size_t show_cmdline(struct vm *vm, char *buf, size_t len)
{
	return (size_t)snprintf(buf, len, "%s\n", vm->cmdline);
}

static int store_number(struct vm *vm, const char *what, const char *val, size_t len,
			uint64_t min, uint64_t max, uint64_t *out)
{
	int r = attr_check_stopped(vm, what);

	if (r < 0)
		return r;
	r = parse_u64(val, len, min, max, out);
	if (r == -EINVAL)
		return vm_fail(vm, EINVAL, "%s: '%.*s' is not a decimal number", what,
			       (int)MIN(len, 64), val);
	if (r == -ERANGE)
		return vm_fail(vm, ERANGE, "%s: must be between %" PRIu64 " and %" PRIu64, what,
			       min, max);
	return 0;
}

static int store_cpus(struct vm *vm, const char *val, size_t len, const struct cred *who)
{
	uint64_t v;
	int r = store_number(vm, "cpus", val, len, 1, 255, &v);

	if (r == 0) {
		vm->cpus = (unsigned)v;
		vm_touch(vm);
	}
	return r;
}

static size_t show_cpus(struct vm *vm, char *buf, size_t len)
{
	return (size_t)snprintf(buf, len, "%u\n", vm->cpus);
}

static int store_memory(struct vm *vm, const char *val, size_t len, const struct cred *who)
{
	uint64_t v;
	int r = store_number(vm, "memory", val, len, 16, cfs.host_ram_mib, &v);

	if (r == 0) {
		vm->memory_mib = v;
		vm_touch(vm);
	}
	return r;
}

static size_t show_memory(struct vm *vm, char *buf, size_t len)
{
	return (size_t)snprintf(buf, len, "%" PRIu64 "\n", vm->memory_mib);
}

static int store_cid(struct vm *vm, const char *val, size_t len, const struct cred *who)
{
	uint64_t v;
	/* 0-2 are reserved (hypervisor, local, host); 2^32-1 is VMADDR_CID_ANY */
	int r = store_number(vm, "cid", val, len, 3, 0xfffffffeu, &v);

	if (r < 0)
		return r;
	if (vm_cid_taken((uint32_t)v, vm))
		return vm_fail(vm, EADDRINUSE, "cid %" PRIu64 " is used by another VM", v);
	vm->cid = (uint32_t)v;
	vm_touch(vm);
	return 0;
}

static size_t show_cid(struct vm *vm, char *buf, size_t len)
{
	return (size_t)snprintf(buf, len, "%" PRIu32 "\n", vm->cid);
}

static size_t show_state(struct vm *vm, char *buf, size_t len)
{
	return (size_t)snprintf(buf, len, "%s\n", vm_state_name(vm->state));
}

static size_t show_error(struct vm *vm, char *buf, size_t len)
{
	return vm->error[0] ? (size_t)snprintf(buf, len, "%s\n", vm->error) : 0;
}

static size_t show_pid(struct vm *vm, char *buf, size_t len)
{
	return vm->proc ? (size_t)snprintf(buf, len, "%d\n", (int)qemu_pid(vm->proc)) : 0;
}

const struct attr_def attr_table[] = {
	{ "kernel", 0644, ATTR_VALUE, show_kernel, store_kernel },
	{ "initrd", 0644, ATTR_VALUE, show_initrd, store_initrd },
	{ "cmdline", 0644, ATTR_VALUE, show_cmdline, store_cmdline },
	{ "cpus", 0644, ATTR_VALUE, show_cpus, store_cpus },
	{ "memory", 0644, ATTR_VALUE, show_memory, store_memory },
	{ "cid", 0644, ATTR_VALUE, show_cid, store_cid },
	{ "ctl", 0200, ATTR_CTL, NULL, NULL },
	{ "state", 0444, ATTR_STATE, show_state, NULL },
	{ "console", 0600, ATTR_CONSOLE, NULL, NULL },
	{ "log", 0400, ATTR_LOG, NULL, NULL },
	{ "error", 0400, ATTR_VALUE, show_error, NULL },
	{ "pid", 0444, ATTR_VALUE, show_pid, NULL },
};
const size_t attr_count = ARRAY_SIZE(attr_table);

int attr_find(const char *name)
{
	size_t i;

	for (i = 0; i < attr_count; i++)
		if (strcmp(attr_table[i].name, name) == 0)
			return (int)i;
	return -1;
}
