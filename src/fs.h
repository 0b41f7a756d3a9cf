/* The FUSE side: the lowlevel operations table and what other parts call to
 * wake readers and pollers. */
#ifndef CAPSAFS_FS_H
#define CAPSAFS_FS_H

#include <fuse_lowlevel.h>

struct vm;

extern const struct fuse_lowlevel_ops fs_ops;

/* fuse_reply_open for stream-like files (console, ctl, vsock nodes): direct
 * I/O, not seekable, and with the kernel's FOPEN_STREAM and
 * FOPEN_PARALLEL_DIRECT_WRITES, which libfuse 3.14 cannot set: a read blocked
 * on one connection must not hold up writes to it or to another connection
 * of the same node, and a write parked on ctl must not hold up the next. */
int fs_reply_open_stream(fuse_req_t req, const struct fuse_file_info *fi);

/* New console output: answer blocked console readers, wake pollers. */
void fs_console_wakeup(struct vm *vm);
/* Something pollable changed (state, console): notify every poll handle. */
void fs_notify_pollers(struct vm *vm);

#endif
