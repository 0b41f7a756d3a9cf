/* A VM's vsock side as the filesystem sees it: declared ports (which survive
 * restarts), the vsock/ctl and vsock/ports files, stream nodes, and the
 * device and exported sockets while the VM runs. */
#ifndef CAPSAFS_VMVSOCK_H
#define CAPSAFS_VMVSOCK_H

#include <fuse_lowlevel.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct vm;

int vmvsock_init(struct vm *vm);
void vmvsock_fini(struct vm *vm);
/* rmdir: remove the VM's socket directory. */
void vmvsock_remove(struct vm *vm);

/* Before QEMU starts: create the device socket and the exported sockets. */
int vmvsock_prepare(struct vm *vm);
/* vhost-user socket for QEMU's -chardev as QEMU sees it (relative to the
 * directory fd it inherits at child_dirfd), or NULL for no vsock device. */
const char *vmvsock_device_socket(struct vm *vm, int child_dirfd, char *buf, size_t len);
/* The socket directory's fd for QEMU to inherit, or -1. */
int vmvsock_dirfd(struct vm *vm);
/* QEMU is gone: reset every connection, remove the sockets. */
void vmvsock_stopped(struct vm *vm);

bool vmvsock_port_name(const char *name, uint32_t *port);
/* Declared ports in ascending order; returns how many (at most max). */
size_t vmvsock_port_list(struct vm *vm, uint32_t *ports, size_t max);
size_t vmvsock_ports_show(struct vm *vm, char *buf, size_t len);
void vmvsock_ctl_write(struct vm *vm, fuse_req_t req, const char *buf, size_t size,
		       const struct cred *who);

/* Open a stream node: each open is one connection; answers req now or
 * later, with fi->fh a struct fh (fh.h) that does the file's I/O. */
void vmvsock_open(struct vm *vm, uint32_t port, fuse_req_t req, struct fuse_file_info *fi);

#endif
