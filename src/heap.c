/* See heap.h.
 *
 * Connection buffers come and go in bursts, across the FUSE threads' malloc
 * arenas, and glibc keeps what was freed: malloc_trim every few seconds makes
 * the daemon's RSS follow what it holds, not its high-water mark.
 *
 * RSS alone cannot tell a leak from memory that is meant to fill up (each
 * VM's 1 MiB console ring, each FUSE worker's 1 MiB request buffer), so
 * SIGUSR1 prints what malloc has handed out, from a self-pipe the loop
 * watches (mallinfo2 is not async-signal-safe):
 *   capsafs: heap: U bytes in use: A in arenas, M in N mmapped blocks; F bytes free kept
 * Small objects (connections, open files, buffered guest data) live in the
 * arenas; the 1 MiB console rings and FUSE request buffers are mmapped.  An
 * ASan build has its own allocator, which mallinfo2 does not see:
 *   capsafs: heap: U bytes in use (ASan allocator)
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <signal.h>
#include <stdio.h>
#include <unistd.h>

#include "heap.h"
#include "log.h"
#include "util.h"

#define TRIM_INTERVAL_MS 10000

static struct loop *heap_loop;
static int sig_pipe[2] = { -1, -1 };
static struct loop_watch *sig_watch;

static void trim_tick(void *arg)
{
	(void)arg;
	malloc_trim(0);
	loop_timer_add(heap_loop, TRIM_INTERVAL_MS, trim_tick, NULL);
}

static void on_usr1(int sig)
{
	int saved = errno;
	ssize_t r = write(sig_pipe[1], "", 1); /* full pipe: a report is due anyway */

	(void)sig;
	(void)r;
	errno = saved;
}

static void heap_report(void *arg, uint32_t events)
{
	char buf[64];

	(void)arg;
	(void)events;
	while (read(sig_pipe[0], buf, sizeof(buf)) > 0)
		;
#ifdef __SANITIZE_ADDRESS__
	fprintf(stderr, "capsafs: heap: %zu bytes in use (ASan allocator)\n", heap_in_use());
#else
	struct mallinfo2 mi = mallinfo2();

	fprintf(stderr,
		"capsafs: heap: %zu bytes in use: %zu in arenas, %zu in %zu mmapped blocks; "
		"%zu bytes free kept\n",
		heap_in_use(), mi.uordblks, mi.hblkhd, mi.hblks, mi.fordblks);
#endif
}

int heap_init(struct loop *l)
{
	struct sigaction sa = { .sa_handler = on_usr1, .sa_flags = SA_RESTART };

	heap_loop = l;
	if (!loop_timer_add(l, TRIM_INTERVAL_MS, trim_tick, NULL))
		return -ENOMEM;
	if (pipe2(sig_pipe, O_NONBLOCK | O_CLOEXEC) < 0)
		return -errno;
	sig_watch = loop_watch_add(l, sig_pipe[0], EPOLLIN, heap_report, NULL);
	if (!sig_watch)
		return -ENOMEM;
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGUSR1, &sa, NULL) < 0)
		return -errno;
	return 0;
}

void heap_fini(void)
{
	signal(SIGUSR1, SIG_IGN); /* exiting: a late report request is moot */
	loop_watch_del(sig_watch);
	sig_watch = NULL;
	for (int i = 0; i < 2; i++) {
		if (sig_pipe[i] >= 0)
			close(sig_pipe[i]);
		sig_pipe[i] = -1;
	}
}
