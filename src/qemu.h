/* Launching QEMU for a VM and owning its process: console socket, QMP,
 * stderr, and the pidfd that tells when it is gone. */
#ifndef CAPSAFS_QEMU_H
#define CAPSAFS_QEMU_H

#include <stddef.h>
#include <sys/types.h>

struct vm;
struct qemu_proc;

/* Which accelerator "auto" means on this host: kvm only where the CPU shows
 * vmx/svm and /dev/kvm opens (a paravirtual /dev/kvm hangs standard guests). */
const char *qemu_accel_detect(void);

/* Find the QEMU binary (PATH lookup for a bare name): 0 or -ENOENT/-EACCES. */
int qemu_find(const char *qemu, char *path, size_t len);

/* Fork+exec QEMU for vm from the loop thread.  kernel_fd/initrd_fd (initrd
 * may be -1) are the files opened with their namer's credentials; the child
 * reads them through /proc/self/fd.  sockdir_fd (or -1 for no vsock device)
 * is the VM's socket directory, where the vhost-user socket is.  Returns 0
 * or -errno with a sentence in vm->error. */
int qemu_spawn(struct vm *vm, int kernel_fd, int initrd_fd, int sockdir_fd);

pid_t qemu_pid(const struct qemu_proc *p);
/* Keystrokes to the serial console: bytes taken or -EAGAIN/-EPIPE. */
ssize_t qemu_console_write(struct qemu_proc *p, const char *buf, size_t len);
int qemu_powerdown(struct qemu_proc *p);
void qemu_signal(struct qemu_proc *p, int sig);
void qemu_proc_free(struct qemu_proc *p);

#endif
