#include "config.h"

#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>

#include "capsafs.h"
#include "log.h"
#include "loop.h"
#include "qemu.h"
#include "qmp.h"
#include "util.h"
#include "vm.h"
#include "vmvsock.h"

struct qemu_proc {
	struct vm *vm;
	pid_t pid;
	int pidfd, con_fd, err_fd;
	struct loop_watch *pid_w, *con_w, *err_w;
	struct qmp *qmp;
	char err_tail[1024]; /* last bytes QEMU wrote to stderr */
	size_t err_len;
};

const char *qemu_accel_detect(void)
{
	__do_fclose FILE *f = fopen("/proc/cpuinfo", "re");
	char line[4096];
	bool virt = false;
	int fd;

	while (f && fgets(line, sizeof(line), f)) {
		if (strncmp(line, "flags", 5) != 0)
			continue;
		if (strstr(line, " vmx") || strstr(line, " svm"))
			virt = true;
		break;
	}
	if (!virt)
		return "tcg";
	fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (fd < 0)
		return "tcg";
	close(fd);
	return "kvm";
}

int qemu_find(const char *qemu, char *path, size_t len)
{
	const char *env = getenv("PATH");
	__do_free char *dirs = NULL;
	char *dir, *save = NULL;

	if (strchr(qemu, '/')) {
		if (access(qemu, X_OK) < 0)
			return -errno;
		snprintf(path, len, "%s", qemu);
		return 0;
	}
	dirs = strdup(env ? env : "/usr/local/bin:/usr/bin:/bin");
	if (!dirs)
		return -ENOMEM;
	for (dir = strtok_r(dirs, ":", &save); dir; dir = strtok_r(NULL, ":", &save)) {
		snprintf(path, len, "%s/%s", dir, qemu);
		if (access(path, X_OK) == 0)
			return 0;
	}
	return -ENOENT;
}

pid_t qemu_pid(const struct qemu_proc *p)
{
	return p->pid;
}

static void qemu_console_readable(void *arg, uint32_t events)
{
	struct qemu_proc *p = arg;
	char buf[16384];
	ssize_t n = recv(p->con_fd, buf, sizeof(buf), MSG_DONTWAIT);

	if (n > 0) {
		vm_console_output(p->vm, buf, (size_t)n);
		return;
	}
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	loop_watch_del(p->con_w); /* QEMU closed it; the pidfd tells the rest */
	p->con_w = NULL;
	(void)events;
}

static void qemu_stderr_readable(void *arg, uint32_t events)
{
	struct qemu_proc *p = arg;
	char buf[4096];
	ssize_t n = read(p->err_fd, buf, sizeof(buf));

	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	if (n <= 0) {
		loop_watch_del(p->err_w);
		p->err_w = NULL;
		return;
	}
	log_info("%s: qemu: %.*s", p->vm->name, (int)n, buf);
	if ((size_t)n >= sizeof(p->err_tail)) {
		memcpy(p->err_tail, buf + n - (sizeof(p->err_tail) - 1), sizeof(p->err_tail) - 1);
		p->err_len = sizeof(p->err_tail) - 1;
	} else {
		size_t keep = MIN(p->err_len, sizeof(p->err_tail) - 1 - (size_t)n);
		memmove(p->err_tail, p->err_tail + p->err_len - keep, keep);
		memcpy(p->err_tail + keep, buf, (size_t)n);
		p->err_len = keep + (size_t)n;
	}
	p->err_tail[p->err_len] = '\0';
	(void)events;
}

static void qemu_exited(void *arg, uint32_t events)
{
	struct qemu_proc *p = arg;
	siginfo_t si = { 0 };
	int status;

	if (waitid(P_PIDFD, (id_t)p->pidfd, &si, WEXITED | WNOHANG) < 0 || si.si_pid == 0)
		return;
	/* drain what QEMU said last: its error message explains the exit */
	while (p->err_w) {
		int before = (int)p->err_len;
		qemu_stderr_readable(p, EPOLLIN);
		if ((int)p->err_len == before)
			break;
	}
	while (p->con_w) {
		char peek;
		if (recv(p->con_fd, &peek, 1, MSG_PEEK | MSG_DONTWAIT) <= 0)
			break;
		qemu_console_readable(p, EPOLLIN);
	}
	status = si.si_code == CLD_EXITED ? (si.si_status << 8) : (si.si_status & 0x7f);
	vm_qemu_exited(p->vm, status, p->err_tail); /* frees p */
	(void)events;
}

static void qmp_on_ready(void *arg)
{
	struct qemu_proc *p = arg;

	vm_qemu_ready(p->vm);
}

static void qmp_on_event(void *arg, const char *name, const char *line)
{
	struct qemu_proc *p = arg;
	char reason[64];

	/* {"event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-reset"}} */
	if (strcmp(name, "SHUTDOWN") == 0)
		vm_guest_shutdown(p->vm, qmp_string_field(line, "reason", reason, sizeof(reason)));
}

static const struct qmp_ops qemu_qmp_ops = {
	.ready = qmp_on_ready,
	.event = qmp_on_event,
};

#define ARGV_MAX 64

struct argv_buf {
	char *v[ARGV_MAX + 1];
	int n;
	char store[8192];
	size_t used;
};

static int argv_add(struct argv_buf *a, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int argv_add(struct argv_buf *a, const char *fmt, ...)
{
	va_list ap;
	int n;

	if (a->n >= ARGV_MAX)
		return -E2BIG;
	va_start(ap, fmt);
	n = vsnprintf(a->store + a->used, sizeof(a->store) - a->used, fmt, ap);
	va_end(ap);
	if (n < 0 || (size_t)n >= sizeof(a->store) - a->used)
		return -E2BIG;
	a->v[a->n++] = a->store + a->used;
	a->v[a->n] = NULL;
	a->used += (size_t)n + 1;
	return 0;
}

/* Fixed fd numbers in the child. */
enum { CHILD_CON_FD = 3, CHILD_QMP_FD, CHILD_KERNEL_FD, CHILD_INITRD_FD, CHILD_SOCKDIR_FD, CHILD_FD_END };

static int qemu_build_argv(struct vm *vm, const char *bin, bool initrd, const char *vhost_sock,
			   struct argv_buf *a)
{
	int r = 0;

	r |= argv_add(a, "%s", bin);
	r |= argv_add(a, "-name");
	r |= argv_add(a, "capsafs-%s", vm->name);
	r |= argv_add(a, "-nodefaults");
	r |= argv_add(a, "-no-user-config");
	r |= argv_add(a, "-display");
	r |= argv_add(a, "none");
	r |= argv_add(a, "-no-reboot");
	r |= argv_add(a, "-machine");
	r |= argv_add(a, "q35,accel=%s,memory-backend=mem", cfs.accel_name);
	r |= argv_add(a, "-object");
	r |= argv_add(a, "memory-backend-memfd,id=mem,size=%" PRIu64 "M,share=on", vm->memory_mib);
	r |= argv_add(a, "-m");
	r |= argv_add(a, "%" PRIu64 "M", vm->memory_mib);
	r |= argv_add(a, "-smp");
	r |= argv_add(a, "%u", vm->cpus);
	if (strcmp(cfs.accel_name, "kvm") == 0) {
		r |= argv_add(a, "-cpu");
		r |= argv_add(a, "host");
	}
	r |= argv_add(a, "-kernel");
	r |= argv_add(a, "/proc/self/fd/%d", CHILD_KERNEL_FD);
	if (initrd) {
		r |= argv_add(a, "-initrd");
		r |= argv_add(a, "/proc/self/fd/%d", CHILD_INITRD_FD);
	}
	r |= argv_add(a, "-append");
	r |= argv_add(a, "%s", vm->cmdline);
	r |= argv_add(a, "-chardev");
	r |= argv_add(a, "socket,id=con,fd=%d", CHILD_CON_FD);
	r |= argv_add(a, "-serial");
	r |= argv_add(a, "chardev:con");
	r |= argv_add(a, "-chardev");
	r |= argv_add(a, "socket,id=qmp,fd=%d", CHILD_QMP_FD);
	r |= argv_add(a, "-mon");
	r |= argv_add(a, "chardev=qmp,mode=control");
	if (vhost_sock) {
		r |= argv_add(a, "-chardev");
		r |= argv_add(a, "socket,id=vsock,path=%s", vhost_sock);
		r |= argv_add(a, "-device");
		r |= argv_add(a, "vhost-user-vsock-pci,chardev=vsock");
	}
	return r ? -E2BIG : 0;
}

/* In the child, between fork and exec: async-signal-safe calls only. */
static void __attribute__((noreturn))
qemu_child(pid_t parent, int con, int qmp, int kernel, int initrd, int sockdir, int err,
	   char **argv)
{
	sigset_t all;
	int devnull, fd;

	prctl(PR_SET_PDEATHSIG, SIGKILL);
	if (getppid() != parent)
		_exit(127);
	setsid(); /* a Ctrl-C at the daemon's terminal must not reach QEMU */
	sigemptyset(&all);
	sigprocmask(SIG_SETMASK, &all, NULL);
	for (fd = 1; fd < NSIG; fd++)
		signal(fd, SIG_DFL);
	/* move the fds above the fixed slots first, then into place */
	con = fcntl(con, F_DUPFD, CHILD_FD_END + 8);
	qmp = fcntl(qmp, F_DUPFD, CHILD_FD_END + 8);
	kernel = fcntl(kernel, F_DUPFD, CHILD_FD_END + 8);
	if (initrd >= 0)
		initrd = fcntl(initrd, F_DUPFD, CHILD_FD_END + 8);
	if (sockdir >= 0)
		sockdir = fcntl(sockdir, F_DUPFD, CHILD_FD_END + 8);
	err = fcntl(err, F_DUPFD, CHILD_FD_END + 8);
	devnull = open("/dev/null", O_RDWR);
	if (con < 0 || qmp < 0 || kernel < 0 || err < 0 || devnull < 0)
		_exit(127);
	dup2(devnull, 0);
	dup2(err, 1);
	dup2(err, 2);
	dup2(con, CHILD_CON_FD);
	dup2(qmp, CHILD_QMP_FD);
	dup2(kernel, CHILD_KERNEL_FD);
	if (initrd >= 0)
		dup2(initrd, CHILD_INITRD_FD);
	if (sockdir >= 0)
		dup2(sockdir, CHILD_SOCKDIR_FD);
	syscall(SYS_close_range, CHILD_FD_END, ~0U, 0);
	execv(argv[0], argv);
	{
		static const char msg[] = "capsafs: cannot execute qemu\n";
		ssize_t w = write(2, msg, sizeof(msg) - 1);
		(void)w;
	}
	_exit(127);
}

int qemu_spawn(struct vm *vm, int kernel_fd, int initrd_fd, int sockdir_fd)
{
	char vhost_buf[64];
	const char *vhost_sock;
	__do_free struct qemu_proc *p = NULL;
	__do_free struct argv_buf *a = NULL;
	int con[2] = { -1, -1 }, qmp[2] = { -1, -1 }, err[2] = { -1, -1 };
	char bin[4096];
	pid_t pid, self = getpid();
	int r;

	r = qemu_find(cfs.qemu, bin, sizeof(bin));
	if (r < 0)
		return vm_fail(vm, -r, "qemu binary '%s' not found or not executable: %s", cfs.qemu,
			       strerror(-r));
	p = calloc(1, sizeof(*p));
	a = calloc(1, sizeof(*a));
	if (!p || !a)
		return vm_fail(vm, ENOMEM, "out of memory");
	p->vm = vm;
	p->pidfd = p->con_fd = p->err_fd = -1;
	/* QEMU reaches the device socket through the directory fd it inherits */
	vhost_sock = sockdir_fd >= 0 ? vmvsock_device_socket(vm, CHILD_SOCKDIR_FD, vhost_buf,
							       sizeof(vhost_buf))
				     : NULL;
	if (qemu_build_argv(vm, bin, initrd_fd >= 0, vhost_sock, a) < 0)
		return vm_fail(vm, E2BIG, "qemu command line too long (kernel command line?)");
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, con) < 0 ||
	    socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, qmp) < 0 ||
	    pipe2(err, O_CLOEXEC) < 0) {
		r = errno;
		goto fail_fds;
	}
	pid = fork();
	if (pid < 0) {
		r = errno;
		goto fail_fds;
	}
	if (pid == 0)
		qemu_child(self, con[1], qmp[1], kernel_fd, initrd_fd, sockdir_fd, err[1], a->v);
	close(con[1]);
	close(qmp[1]);
	close(err[1]);
	p->pid = pid;
	p->con_fd = con[0];
	p->err_fd = err[0];
	fcntl(p->con_fd, F_SETFL, O_NONBLOCK);
	fcntl(p->err_fd, F_SETFL, O_NONBLOCK);
	p->pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
	if (p->pidfd < 0) {
		r = errno;
		kill(pid, SIGKILL);
		waitpid(pid, NULL, 0);
		close(qmp[0]);
		close(p->con_fd);
		close(p->err_fd);
		return vm_fail(vm, r, "pidfd_open: %s", strerror(r));
	}
	p->pid_w = loop_watch_add(cfs.loop, p->pidfd, EPOLLIN, qemu_exited, p);
	p->con_w = loop_watch_add(cfs.loop, p->con_fd, EPOLLIN, qemu_console_readable, p);
	p->err_w = loop_watch_add(cfs.loop, p->err_fd, EPOLLIN, qemu_stderr_readable, p);
	p->qmp = qmp_new(cfs.loop, qmp[0], &qemu_qmp_ops, p);
	if (!p->pid_w || !p->con_w || !p->err_w || !p->qmp) {
		/* cannot watch it: do not leave it running unobserved */
		kill(pid, SIGKILL);
		waitpid(pid, NULL, 0);
		if (!p->qmp)
			close(qmp[0]);
		vm->proc = move_ptr(p);
		qemu_proc_free(vm->proc);
		vm->proc = NULL;
		return vm_fail(vm, ENOMEM, "cannot watch the qemu process");
	}
	log_info("%s: qemu started, pid %d", vm->name, (int)pid);
	vm->proc = move_ptr(p);
	return 0;

fail_fds:
	for (int i = 0; i < 2; i++) {
		if (con[i] >= 0)
			close(con[i]);
		if (qmp[i] >= 0)
			close(qmp[i]);
		if (err[i] >= 0)
			close(err[i]);
	}
	return vm_fail(vm, r, "cannot start qemu: %s", strerror(r));
}

ssize_t qemu_console_write(struct qemu_proc *p, const char *buf, size_t len)
{
	ssize_t n = send(p->con_fd, buf, len, MSG_NOSIGNAL | MSG_DONTWAIT);

	return n < 0 ? -errno : n;
}

int qemu_powerdown(struct qemu_proc *p)
{
	return qmp_execute(p->qmp, "system_powerdown");
}

void qemu_signal(struct qemu_proc *p, int sig)
{
	/* the pidfd cannot be recycled: signalling through it never hits a
	 * stranger that took over the pid */
	if (syscall(SYS_pidfd_send_signal, p->pidfd, sig, NULL, 0) < 0 && errno != ESRCH)
		log_warn("%s: cannot signal qemu: %s", p->vm->name, strerror(errno));
}

void qemu_proc_free(struct qemu_proc *p)
{
	if (!p)
		return;
	loop_watch_del(p->pid_w);
	loop_watch_del(p->con_w);
	loop_watch_del(p->err_w);
	qmp_free(p->qmp);
	if (p->pidfd >= 0)
		close(p->pidfd);
	if (p->con_fd >= 0)
		close(p->con_fd);
	if (p->err_fd >= 0)
		close(p->err_fd);
	free(p);
}
