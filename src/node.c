#include "config.h"

#include <stdlib.h>

#include "node.h"
#include "util.h"
#include "vm.h"

#define NODE_HASH 4096

static struct node *table[NODE_HASH];
static struct node root = { .ino = FUSE_ROOT_ID, .kind = NODE_ROOT, .nlookup = 1 };
static fuse_ino_t next_ino = FUSE_ROOT_ID + 1; /* never reused: no stale handles */

static void node_hash_add(struct node *n)
{
	struct node **b = &table[n->ino % NODE_HASH];

	n->hnext = *b;
	*b = n;
}

static void node_hash_del(struct node *n)
{
	struct node **pp;

	for (pp = &table[n->ino % NODE_HASH]; *pp; pp = &(*pp)->hnext) {
		if (*pp == n) {
			*pp = n->hnext;
			return;
		}
	}
}

void node_table_init(void)
{
	node_hash_add(&root);
}

struct node *node_root(void)
{
	return &root;
}

struct node *node_by_ino(fuse_ino_t ino)
{
	struct node *n;

	for (n = table[ino % NODE_HASH]; n; n = n->hnext)
		if (n->ino == ino)
			return n;
	return NULL;
}

struct node *node_vm_child(struct vm *vm, enum node_kind kind, int attr, uint32_t port)
{
	struct node *n;

	for (n = vm->nodes; n; n = n->vnext)
		if (n->kind == kind && (kind != NODE_ATTR || n->attr == attr) &&
		    (kind != NODE_VSOCK_PORT || n->port == port))
			return n;
	n = calloc(1, sizeof(*n));
	if (!n)
		return NULL;
	n->ino = next_ino++;
	n->kind = kind;
	n->vm = vm;
	n->attr = attr;
	n->port = port;
	vm_get(vm);
	n->vnext = vm->nodes;
	vm->nodes = n;
	node_hash_add(n);
	return n;
}

static void node_free(struct node *n)
{
	node_hash_del(n);
	vm_put(n->vm);
	free(n);
}

void node_forget(struct node *n, uint64_t nlookup)
{
	if (n == &root)
		return;
	n->nlookup = nlookup > n->nlookup ? 0 : n->nlookup - nlookup;
	if (n->nlookup == 0 && n->dead)
		node_free(n);
}

void node_vm_removed(struct vm *vm)
{
	struct node *n = vm->nodes, *next;

	vm->nodes = NULL;
	for (; n; n = next) {
		next = n->vnext;
		n->vnext = NULL;
		n->dead = true;
		if (n->nlookup == 0)
			node_free(n);
	}
}
