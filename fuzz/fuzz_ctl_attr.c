/* What a user writes into a VM's files: the attribute store functions
 * (src/attr.c attr_table), the VM ctl commands and the vsock/ctl commands
 * (the real tables in src/vm.c and src/vsock_ports.c, reached through
 * vm_ctl_write / vmvsock_ctl_write as the FUSE layer calls them), and the
 * parse_u64 / dup_value helpers underneath, against reference versions.
 *
 * Input: records [target][len][len bytes] applied in order to one fresh VM
 * (so "listen 5" then "close 5" builds state).  QEMU is set to a path that
 * does not exist: "start" must fail cleanly, never fork.
 *
 * Checked after every write: one reply per request; a failed write leaves a
 * one-line vm->error; a stored value reads back (show) and stores again to
 * the same value; the declared port list stays sorted and unique. */
#include "config.h"

#include <fuse_lowlevel.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "attr.h"
#include "capsafs.h"
#include "cred.h"
#include "log.h"
#include "loop.h"
#include "util.h"
#include "vm.h"
#include "vmvsock.h"
#include "fuzz_input.h"

struct capsafs cfs; /* main.c's, which is not linked */

/* The FUSE replies, interposed: count them and keep the answer. */
static int replies, reply_err;
static size_t reply_size;

int fuse_reply_err(fuse_req_t req, int err)
{
	(void)req;
	replies++;
	reply_err = err;
	return 0;
}

int fuse_reply_write(fuse_req_t req, size_t count)
{
	(void)req;
	replies++;
	reply_err = 0;
	reply_size = count;
	return 0;
}

static void init_once(void)
{
	static bool done;

	if (done)
		return;
	done = true;
	log_verbosity = LOG_ERR;
	cfs.qemu = "/nonexistent/capsafs-fuzz/qemu-system-x86_64";
	cfs.sockdir = "/nonexistent/capsafs-fuzz/sock";
	cfs.host_ram_mib = 4096;
	cfs.stop_timeout = CAPSAFS_STOP_TIMEOUT_DEFAULT;
	cfs.uid = geteuid();
	cfs.gid = getegid();
	big_lock();
	cfs.loop = loop_new();
	if (!cfs.loop)
		abort();
	/* a second VM owns a cid, for the "used by another VM" path */
	struct vm *other;
	if (vm_create("other", 0, 0, &other) < 0)
		abort();
	other->cid = 4242;
	big_unlock();
}

static void check_error_line(const struct vm *vm)
{
	if (!memchr(vm->error, '\0', sizeof(vm->error)) || strchr(vm->error, '\n')) {
		fprintf(stderr, "vm->error is not one line: '%s'\n", vm->error);
		abort();
	}
}

/* reference strict decimal parser (see util.h) */
static int ref_parse_u64(const char *s, size_t len, uint64_t min, uint64_t max, uint64_t *out)
{
	unsigned __int128 v = 0;
	bool big = false;
	size_t i;

	if (len && s[len - 1] == '\n')
		len--;
	if (!len)
		return -EINVAL;
	for (i = 0; i < len; i++)
		if (s[i] < '0' || s[i] > '9')
			return -EINVAL;
	for (i = 0; i < len && !big; i++) {
		v = v * 10 + (unsigned)(s[i] - '0');
		big = v > UINT64_MAX;
	}
	if (big || v < min || v > max)
		return -ERANGE;
	*out = (uint64_t)v;
	return 0;
}

static void fuzz_parsers(const uint8_t *p, size_t n, uint64_t a, uint64_t b)
{
	uint64_t min = a < b ? a : b, max = a < b ? b : a, v1 = 0, v2 = 0;
	int r1 = parse_u64((const char *)p, n, min, max, &v1);
	int r2 = ref_parse_u64((const char *)p, n, min, max, &v2);
	char *d;

	if (r1 != r2 || (r1 == 0 && v1 != v2)) {
		fprintf(stderr, "parse_u64: %d/%" PRIu64 ", reference %d/%" PRIu64 "\n", r1, v1,
			r2, v2);
		abort();
	}
	d = dup_value((const char *)p, n);
	{
		size_t m = n && p[n - 1] == '\n' ? n - 1 : n;
		bool ok = !memchr(p, '\0', m) && !memchr(p, '\n', m);
		if (ok != (d != NULL) || (d && (strlen(d) != m || memcmp(d, p, m) != 0)))
			abort();
	}
	free(d);
}

static void check_ports(struct vm *vm)
{
	uint32_t ports[512];
	size_t n = vmvsock_port_list(vm, ports, 512), i;
	char buf[8192];

	for (i = 1; i < n; i++)
		if (ports[i - 1] >= ports[i])
			abort();
	vmvsock_ports_show(vm, buf, sizeof(buf));
}

/* A stored value reads back as something that stores to the same value. */
static void check_roundtrip(struct vm *vm, const struct attr_def *a, const struct cred *who)
{
	char s1[ATTR_VALUE_MAX + 2], s2[ATTR_VALUE_MAX + 2];
	size_t n1, n2;

	n1 = a->show(vm, s1, sizeof(s1));
	if (n1 >= sizeof(s1))
		return; /* truncated: nothing to compare */
	if (n1 == 0 || s1[n1 - 1] != '\n')
		abort();
	if (a->store(vm, s1, n1, who) != 0) {
		fprintf(stderr, "%s: shown value '%.*s' does not store back: %s\n", a->name,
			(int)n1, s1, vm->error);
		abort();
	}
	n2 = a->show(vm, s2, sizeof(s2));
	if (n1 != n2 || memcmp(s1, s2, n1) != 0)
		abort();
}

/* kernel/initrd open the path: keep the fuzzer off devices and FIFOs,
 * where open() may block or act. */
static bool path_safe(const uint8_t *p, size_t n)
{
	char path[ATTR_VALUE_MAX + 1];
	struct stat st;

	if (n > ATTR_VALUE_MAX)
		return false;
	memcpy(path, p, n);
	path[n] = '\0';
	if (n && path[n - 1] == '\n')
		path[n - 1] = '\0';
	if (memchr(path, '\0', n ? n - 1 : 0) || stat(path, &st) < 0)
		return true; /* rejected before open, or does not exist */
	return S_ISREG(st.st_mode) || S_ISDIR(st.st_mode);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct fin f = { data, size };
	struct cred who = { 0 };
	struct vm *vm;
	unsigned steps = 0;

	init_once();
	big_lock();
	if (vm_create("fuzz", 0, 0, &vm) < 0)
		abort();
	who.uid = geteuid();
	who.gid = getegid();
	while (fin_left(&f) && steps++ < 64) {
		uint8_t target = fin_u8(&f);
		const uint8_t *p;
		size_t n = fin_take(&f, &p, fin_u16(&f) % (ATTR_VALUE_MAX + 64));
		char buf[ATTR_VALUE_MAX + 64];
		int r;

		memcpy(buf, p, n); /* a FUSE write buffer is not NUL-terminated */
		vm->error[0] = '\0';
		switch (target % 4) {
		case 0: { /* an attribute file */
			const struct attr_def *a = &attr_table[(target / 4) % attr_count];
			if (!a->store)
				break;
			if ((a->store == attr_table[attr_find("kernel")].store ||
			     a->store == attr_table[attr_find("initrd")].store) &&
			    !path_safe(p, n))
				break;
			r = a->store(vm, buf, n, &who);
			if (r > 0)
				abort();
			if (r < 0)
				check_error_line(vm);
			else if (a->show)
				check_roundtrip(vm, a, &who);
			break;
		}
		case 1: /* the VM's ctl */
			replies = 0;
			vm_ctl_write(vm, (fuse_req_t)&who, buf, n, &who);
			if (replies != 1 || (reply_err == 0 && reply_size != n))
				abort();
			check_error_line(vm);
			if (vm_is_active(vm)) /* without QEMU nothing can start */
				abort();
			break;
		case 2: /* vsock/ctl */
			replies = 0;
			vmvsock_ctl_write(vm, (fuse_req_t)&who, buf, n, &who);
			if (replies != 1 || (reply_err == 0 && reply_size != n))
				abort();
			check_error_line(vm);
			check_ports(vm);
			break;
		case 3:
			fuzz_parsers(p, n, fin_u64(&f), fin_u64(&f));
			break;
		}
	}
	if (vm_remove(vm) < 0)
		abort();
	big_unlock();
	return 0;
}
