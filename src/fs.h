/* The FUSE side: the lowlevel operations table and what other parts call to
 * wake readers and pollers. */
#ifndef CAPSAFS_FS_H
#define CAPSAFS_FS_H

#include <fuse_lowlevel.h>

struct vm;

extern const struct fuse_lowlevel_ops fs_ops;

/* New console output: answer blocked console readers, wake pollers. */
void fs_console_wakeup(struct vm *vm);
/* Something pollable changed (state, console): notify every poll handle. */
void fs_notify_pollers(struct vm *vm);

#endif
