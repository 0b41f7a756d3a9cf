/* capsafs: options → session → signal handlers → mount → loop → unmount. */
#include "config.h"

#include <fuse_lowlevel.h>
#include <limits.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysinfo.h>

#include "capsafs.h"
#include "fh.h"
#include "fs.h"
#include "heap.h"
#include "log.h"
#include "loop.h"
#include "node.h"
#include "pending.h"
#include "qemu.h"
#include "util.h"
#include "vm.h"
#include "vmvsock.h"

struct capsafs cfs;

struct options {
	char *sockdir, *qemu, *accel, *vsock, *kernel, *initrd;
	unsigned stop_timeout;
};

#define OPT(t, p) { t, offsetof(struct options, p), 1 }
static const struct fuse_opt option_spec[] = {
	OPT("sockdir=%s", sockdir), OPT("qemu=%s", qemu),     OPT("accel=%s", accel),
	OPT("vsock=%s", vsock),     OPT("kernel=%s", kernel), OPT("initrd=%s", initrd),
	OPT("stop_timeout=%u", stop_timeout), FUSE_OPT_END
};

static void usage(const char *prog)
{
	printf("usage: %s [-f] [-d] [-o OPTION[,OPTION...]] MOUNTPOINT\n\n"
	       "capsafs options:\n"
	       "    -o sockdir=DIR         exported vsock sockets (default: /run/capsafs/<mount> as root,\n"
	       "                           $XDG_RUNTIME_DIR/capsafs/<mount> otherwise)\n"
	       "    -o qemu=PATH           QEMU binary (default: qemu-system-x86_64 from PATH)\n"
	       "    -o accel=auto|kvm|tcg  accelerator (default: auto)\n"
	       "    -o vsock=user|kernel   vsock backend (default: user)\n"
	       "    -o kernel=PATH         default kernel (default: %s/vmlinuz)\n"
	       "    -o initrd=PATH         default initrd (default: %s/initrd.img)\n"
	       "    -o stop_timeout=SECS   grace before 'stop' kills (default: %d)\n\n",
	       prog, CAPSAFS_GUEST_DIR, CAPSAFS_GUEST_DIR, CAPSAFS_STOP_TIMEOUT_DEFAULT);
}

/* /tmp/vms → "tmp-vms": one socket directory per mount point.  A long mount
 * path keeps its last 24 characters behind a hash of the whole, so the name
 * stays short and still tells which mount it is. */
static void escape_path(const char *path, char *out, size_t len)
{
	char esc[PATH_MAX];
	size_t o = 0, n;
	uint32_t h = 2166136261u; /* FNV-1a */
	const char *p;

	while (*path == '/')
		path++;
	if (!*path)
		path = "-";
	for (p = path; *p && o + 1 < sizeof(esc); p++) {
		esc[o++] = *p == '/' ? '-' : *p;
		h = (h ^ (uint8_t)*p) * 16777619u;
	}
	esc[o] = '\0';
	n = strlen(esc);
	if (n <= 32)
		snprintf(out, len, "%s", esc);
	else
		snprintf(out, len, "%08x-%s", h, esc + n - 24);
}

static bool sockdir_created;

static int setup_sockdir(const char *mountpoint, const char *given)
{
	char base[PATH_MAX / 2], name[PATH_MAX / 4], path[PATH_MAX];
	const char *rt = getenv("XDG_RUNTIME_DIR");
	int r;

	if (given) {
		snprintf(path, sizeof(path), "%s", given);
	} else {
		if (geteuid() == 0)
			snprintf(base, sizeof(base), "/run/capsafs");
		else if (rt && *rt)
			snprintf(base, sizeof(base), "%s/capsafs", rt);
		else
			snprintf(base, sizeof(base), "/tmp/capsafs-%d", (int)geteuid());
		escape_path(mountpoint, name, sizeof(name));
		snprintf(path, sizeof(path), "%s/%s", base, name);
	}
	sockdir_created = access(path, F_OK) < 0;
	r = mkdir_p(path, 0700);
	if (r < 0) {
		fprintf(stderr, "capsafs: cannot create socket directory %s: %s\n", path,
			strerror(-r));
		return -1;
	}
	if (chmod(path, 0700) < 0) {
		fprintf(stderr, "capsafs: cannot chmod %s: %s\n", path, strerror(errno));
		return -1;
	}
	cfs.sockdir = strdup(path);
	return cfs.sockdir ? 0 : -1;
}

/* Is a capsafs file system still mounted at mnt (in our mount namespace)? */
static bool still_mounted(const char *mnt)
{
	__do_fclose FILE *f = fopen("/proc/self/mountinfo", "re");
	char line[8192], point[PATH_MAX];

	while (f && fgets(line, sizeof(line), f)) {
		/* id parent major:minor root mountpoint ... - fstype ... */
		if (sscanf(line, "%*s %*s %*s %*s %4095s", point) == 1 && strcmp(point, mnt) == 0 &&
		    strstr(line, " - fuse.capsafs "))
			return true;
	}
	return false;
}

static int parse_options(struct options *o)
{
	if (!o->accel || strcmp(o->accel, "auto") == 0)
		cfs.accel = ACCEL_AUTO;
	else if (strcmp(o->accel, "kvm") == 0)
		cfs.accel = ACCEL_KVM;
	else if (strcmp(o->accel, "tcg") == 0)
		cfs.accel = ACCEL_TCG;
	else {
		fprintf(stderr, "capsafs: accel=%s: expected auto, kvm or tcg\n", o->accel);
		return -1;
	}
	if (!o->vsock || strcmp(o->vsock, "user") == 0)
		cfs.vsock = VSOCK_USER;
	else if (strcmp(o->vsock, "kernel") == 0)
		cfs.vsock = VSOCK_KERNEL;
	else {
		fprintf(stderr, "capsafs: vsock=%s: expected user or kernel\n", o->vsock);
		return -1;
	}
	if (cfs.vsock == VSOCK_KERNEL && access("/dev/vhost-vsock", F_OK) < 0) {
		fprintf(stderr, "capsafs: vsock=kernel needs /dev/vhost-vsock, which this host lacks\n");
		return -1;
	}
	if ((o->kernel && o->kernel[0] != '/') || (o->initrd && o->initrd[0] && o->initrd[0] != '/')) {
		fprintf(stderr, "capsafs: kernel= and initrd= take absolute paths\n");
		return -1;
	}
	cfs.qemu = o->qemu ? o->qemu : strdup("qemu-system-x86_64");
	cfs.kernel = o->kernel ? o->kernel : strdup(CAPSAFS_GUEST_DIR "/vmlinuz");
	cfs.initrd = o->initrd ? o->initrd : strdup(CAPSAFS_GUEST_DIR "/initrd.img");
	cfs.stop_timeout = o->stop_timeout ? o->stop_timeout : CAPSAFS_STOP_TIMEOUT_DEFAULT;
	cfs.accel_name = cfs.accel == ACCEL_KVM ? "kvm"
		       : cfs.accel == ACCEL_TCG ? "tcg"
						: qemu_accel_detect();
	return 0;
}

int main(int argc, char *argv[])
{
	struct fuse_args args = FUSE_ARGS_INIT(argc, argv);
	struct fuse_cmdline_opts opts = { 0 };
	struct fuse_loop_config *lc = NULL;
	struct options o = { 0 };
	struct fuse_session *se = NULL;
	struct sysinfo si;
	char mnt[PATH_MAX];
	int ret = 1;

	if (fuse_opt_parse(&args, &o, option_spec, NULL) < 0)
		goto out_args;
	if (fuse_parse_cmdline(&args, &opts) != 0)
		goto out_args; /* libfuse said why (a bad mount point, ...) */
	if (opts.show_help) {
		usage(argv[0]);
		fuse_cmdline_help();
		fuse_lowlevel_help();
		ret = 0;
		goto out_args;
	}
	if (opts.show_version) {
		printf("capsafs %s\n", PACKAGE_VERSION);
		fuse_lowlevel_version();
		ret = 0;
		goto out_args;
	}
	if (!opts.mountpoint) {
		fprintf(stderr, "capsafs: no mount point given (try --help)\n");
		goto out_args;
	}
	if (opts.debug)
		log_verbosity = LOG_DEBUG;
	if (parse_options(&o) < 0)
		goto out_args;
	if (!realpath(opts.mountpoint, mnt)) {
		fprintf(stderr, "capsafs: bad mount point '%s': %s\n", opts.mountpoint,
			strerror(errno));
		goto out_args;
	}
	cfs.mountpoint = mnt;
	sysinfo(&si);
	cfs.host_ram_mib = (uint64_t)si.totalram * si.mem_unit / (1024 * 1024);
	cfs.uid = getuid();
	cfs.gid = getgid();
	cfs.root_mode = 0755;
	clock_gettime(CLOCK_REALTIME, &cfs.mount_time);
	node_table_init();

	se = fuse_session_new(&args, &fs_ops, sizeof(fs_ops), NULL);
	if (!se)
		goto out_args; /* libfuse said why (unknown option, ...) */
	cfs.se = se;
	/* only once every option is known good: a refused start leaves nothing */
	if (setup_sockdir(mnt, o.sockdir) < 0)
		goto out_session;
	if (fuse_set_signal_handlers(se) != 0)
		goto out_session;
	if (fuse_session_mount(se, mnt) != 0)
		goto out_signals;
	if (fuse_daemonize(opts.foreground) != 0)
		goto out_unmount;
	/* threads only after daemonize: fork keeps just the calling thread */
	cfs.loop = loop_new();
	if (!cfs.loop || loop_start(cfs.loop) < 0) {
		log_err("cannot start the event loop");
		goto out_unmount;
	}
	pending_init(cfs.loop);
	big_lock();
	if (heap_init(cfs.loop) < 0)
		log_warn("cannot start the heap trim timer and its SIGUSR1 report");
	big_unlock();
	log_info("mounted on %s, sockets in %s, accel %s", mnt, cfs.sockdir, cfs.accel_name);

	if (opts.singlethread) {
		ret = fuse_session_loop(se);
	} else {
		lc = fuse_loop_cfg_create();
		fuse_loop_cfg_set_clone_fd(lc, opts.clone_fd);
		fuse_loop_cfg_set_max_threads(lc, opts.max_threads);
		ret = fuse_session_loop_mt(se, lc);
		fuse_loop_cfg_destroy(lc);
	}
	/* After an unmount (a lazy one with files still open included) the
	 * loop's last read may report an error from the torn-down channel:
	 * the file system ended as asked, which is a clean exit. */
	if (ret < 0 && !still_mounted(mnt)) {
		log_info("session ended after unmount (%s)", strerror(-ret));
		ret = 0;
	}
	ret = ret < 0 ? 1 : 0;
	vm_shutdown_all();
	loop_stop(cfs.loop);
	big_lock();
	fh_release_all(); /* files the kernel never released */
	heap_fini();
	big_unlock();
	for (struct vm *vm = cfs.vms; vm; vm = vm->next)
		vmvsock_remove(vm); /* the VMs' socket directories go with the mount */
out_unmount:
	fuse_session_unmount(se);
out_signals:
	fuse_remove_signal_handlers(se);
out_session:
	fuse_session_destroy(se);
	if (cfs.sockdir && sockdir_created)
		rmdir(cfs.sockdir); /* only if empty: a user's files stay */
out_args:
	/* fuse_opt_parse strdup'ed every string option; qemu, kernel and
	 * initrd moved to cfs if the options were good */
	free(o.sockdir);
	free(o.accel);
	free(o.vsock);
	if (cfs.qemu) {
		free(cfs.qemu);
		free(cfs.kernel);
		free(cfs.initrd);
	} else {
		free(o.qemu);
		free(o.kernel);
		free(o.initrd);
	}
	free(cfs.sockdir);
	free(opts.mountpoint);
	fuse_opt_free_args(&args);
	return ret;
}
