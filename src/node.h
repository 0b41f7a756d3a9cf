/* The inode table: every file capsafs shows is a node with a fixed kind. */
#ifndef CAPSAFS_NODE_H
#define CAPSAFS_NODE_H

#include <fuse_lowlevel.h>
#include <stdbool.h>
#include <stdint.h>

struct vm;

enum node_kind {
	NODE_ROOT,
	NODE_VM,          /* <vm>/ */
	NODE_ATTR,        /* <vm>/<attribute> */
	NODE_VSOCK_DIR,   /* <vm>/vsock/ */
	NODE_VSOCK_CTL,   /* <vm>/vsock/ctl */
	NODE_VSOCK_PORTS, /* <vm>/vsock/ports */
	NODE_VSOCK_PORT,  /* <vm>/vsock/<port> */
};

struct node {
	fuse_ino_t ino;
	enum node_kind kind;
	struct vm *vm; /* holds a reference; NULL for the root */
	int attr;      /* NODE_ATTR: index in the attribute table */
	uint32_t port; /* NODE_VSOCK_PORT */
	uint64_t nlookup;
	bool dead; /* its VM was removed: kept until the kernel forgets it */
	struct node *hnext; /* ino hash chain */
	struct node *vnext; /* the VM's node list */
};

void node_table_init(void);
struct node *node_root(void);
struct node *node_by_ino(fuse_ino_t ino);
/* The child node of vm of that kind (created on first use). */
struct node *node_vm_child(struct vm *vm, enum node_kind kind, int attr, uint32_t port);
void node_forget(struct node *n, uint64_t nlookup);
/* rmdir: every node of vm goes dead. */
void node_vm_removed(struct vm *vm);

#endif
