/* The daemon's one event loop: an epoll thread that owns every host fd that is
 * not a FUSE channel (QEMU pipes, QMP, vhost-user, vsock sockets) plus timers
 * and calls deferred from FUSE threads.
 *
 * Locking: all capsafs state is guarded by one recursive "big lock".  The loop
 * thread holds it while it runs a callback; FUSE handlers take it around their
 * work.  Every loop_* function below must be called with the big lock held. */
#ifndef CAPSAFS_LOOP_H
#define CAPSAFS_LOOP_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/epoll.h>

struct loop;
struct loop_watch;
struct loop_timer;

typedef void (*loop_fd_fn)(void *arg, uint32_t events);
typedef void (*loop_fn)(void *arg);

void big_lock(void);
void big_unlock(void);

struct loop *loop_new(void);
/* Start the loop thread.  Children forked from loop callbacks get
 * PR_SET_PDEATHSIG tied to this thread, which lives until loop_stop. */
int loop_start(struct loop *l);
/* One round of the loop in the calling thread, for tests and fuzzers that
 * drive it without loop_start: waits up to timeout_ms (-1: until the next
 * timer) for fds, runs their callbacks, then due timers and loop_calls.
 * Call with the big lock held (it is dropped while waiting).  Returns the
 * number of ready fds or -errno. */
int loop_run_once(struct loop *l, int timeout_ms);
/* Stop and join the loop thread; call WITHOUT the big lock. */
void loop_stop(struct loop *l);
void loop_free(struct loop *l);
bool loop_in_thread(struct loop *l);

/* Watch fd for events (EPOLLIN, EPOLLOUT, ...; level-triggered).  The callback
 * runs in the loop thread with the big lock held. */
struct loop_watch *loop_watch_add(struct loop *l, int fd, uint32_t events, loop_fd_fn fn,
				  void *arg);
int loop_watch_mod(struct loop_watch *w, uint32_t events);
uint32_t loop_watch_events(const struct loop_watch *w);
/* Safe from inside any callback; fn is never called again after this. The fd
 * is not closed. */
void loop_watch_del(struct loop_watch *w);

/* One-shot timer after ms milliseconds. */
struct loop_timer *loop_timer_add(struct loop *l, uint64_t ms, loop_fn fn, void *arg);
void loop_timer_cancel(struct loop_timer *t);

/* Run fn(arg) soon in the loop thread (with the big lock).  The one call
 * that may be made without the big lock held. */
int loop_call(struct loop *l, loop_fn fn, void *arg);

#endif
