#include "config.h"

#include <pthread.h>
#include <string.h>
#include <sys/eventfd.h>

#include "log.h"
#include "loop.h"
#include "util.h"

struct loop_watch {
	struct loop *loop;
	int fd;
	uint32_t events;
	loop_fd_fn fn;
	void *arg;
	bool dead;
	struct loop_watch *next_dead;
};

struct loop_timer {
	struct loop *loop;
	uint64_t due;
	loop_fn fn;
	void *arg;
	struct loop_timer *next;
};

struct loop_callq {
	loop_fn fn;
	void *arg;
	struct loop_callq *next;
};

struct loop {
	pthread_mutex_t call_mutex; /* loop_call may run without the big lock */
	int epfd;
	int wakefd;
	pthread_t thread;
	bool running;
	bool stop;
	struct loop_timer *timers; /* sorted by due */
	struct loop_callq *calls, **calls_tail;
	struct loop_watch *dead;
};

static pthread_mutex_t big_mutex;
static pthread_once_t big_once = PTHREAD_ONCE_INIT;

static void big_init(void)
{
	pthread_mutexattr_t a;

	pthread_mutexattr_init(&a);
	pthread_mutexattr_settype(&a, PTHREAD_MUTEX_RECURSIVE);
	pthread_mutex_init(&big_mutex, &a);
	pthread_mutexattr_destroy(&a);
}

void big_lock(void)
{
	pthread_once(&big_once, big_init);
	pthread_mutex_lock(&big_mutex);
}

void big_unlock(void)
{
	pthread_mutex_unlock(&big_mutex);
}

static void loop_wake(struct loop *l)
{
	uint64_t one = 1;

	if (write(l->wakefd, &one, sizeof(one)) < 0 && errno != EAGAIN)
		log_warn("loop wake: %s", strerror(errno));
}

struct loop *loop_new(void)
{
	struct loop *l = calloc(1, sizeof(*l));
	struct epoll_event ev = { .events = EPOLLIN };

	if (!l)
		return NULL;
	l->epfd = epoll_create1(EPOLL_CLOEXEC);
	l->wakefd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	l->calls_tail = &l->calls;
	pthread_mutex_init(&l->call_mutex, NULL);
	if (l->epfd < 0 || l->wakefd < 0)
		goto fail;
	ev.data.ptr = NULL; /* NULL marks the wake fd */
	if (epoll_ctl(l->epfd, EPOLL_CTL_ADD, l->wakefd, &ev) < 0)
		goto fail;
	return l;
fail:
	if (l->epfd >= 0)
		close(l->epfd);
	if (l->wakefd >= 0)
		close(l->wakefd);
	free(l);
	return NULL;
}

bool loop_in_thread(struct loop *l)
{
	return l->running && pthread_equal(pthread_self(), l->thread);
}

struct loop_watch *loop_watch_add(struct loop *l, int fd, uint32_t events, loop_fd_fn fn,
				  void *arg)
{
	struct loop_watch *w = calloc(1, sizeof(*w));
	struct epoll_event ev = { .events = events };

	if (!w)
		return NULL;
	w->loop = l;
	w->fd = fd;
	w->events = events;
	w->fn = fn;
	w->arg = arg;
	ev.data.ptr = w;
	if (epoll_ctl(l->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
		int e = errno;
		free(w);
		errno = e;
		return NULL;
	}
	return w;
}

int loop_watch_mod(struct loop_watch *w, uint32_t events)
{
	struct epoll_event ev = { .events = events, .data.ptr = w };

	if (w->events == events)
		return 0;
	if (epoll_ctl(w->loop->epfd, EPOLL_CTL_MOD, w->fd, &ev) < 0)
		return -errno;
	w->events = events;
	return 0;
}

uint32_t loop_watch_events(const struct loop_watch *w)
{
	return w->events;
}

void loop_watch_del(struct loop_watch *w)
{
	if (!w || w->dead)
		return;
	epoll_ctl(w->loop->epfd, EPOLL_CTL_DEL, w->fd, NULL);
	w->dead = true;
	/* freed after the current batch: its epoll_event may still point here */
	w->next_dead = w->loop->dead;
	w->loop->dead = w;
}

struct loop_timer *loop_timer_add(struct loop *l, uint64_t ms, loop_fn fn, void *arg)
{
	struct loop_timer *t = calloc(1, sizeof(*t)), **pp;

	if (!t)
		return NULL;
	t->loop = l;
	t->due = now_ms() + ms;
	t->fn = fn;
	t->arg = arg;
	for (pp = &l->timers; *pp && (*pp)->due <= t->due; pp = &(*pp)->next)
		;
	t->next = *pp;
	*pp = t;
	if (!loop_in_thread(l))
		loop_wake(l);
	return t;
}

void loop_timer_cancel(struct loop_timer *t)
{
	struct loop_timer **pp;

	if (!t)
		return;
	for (pp = &t->loop->timers; *pp; pp = &(*pp)->next) {
		if (*pp == t) {
			*pp = t->next;
			free(t);
			return;
		}
	}
}

int loop_call(struct loop *l, loop_fn fn, void *arg)
{
	struct loop_callq *c = calloc(1, sizeof(*c));

	if (!c)
		return -ENOMEM;
	c->fn = fn;
	c->arg = arg;
	pthread_mutex_lock(&l->call_mutex);
	*l->calls_tail = c;
	l->calls_tail = &c->next;
	pthread_mutex_unlock(&l->call_mutex);
	loop_wake(l);
	return 0;
}

static void loop_run_due(struct loop *l)
{
	uint64_t now = now_ms();

	while (l->timers && l->timers->due <= now) {
		struct loop_timer *t = l->timers;
		l->timers = t->next;
		t->fn(t->arg);
		free(t);
	}
	for (;;) {
		struct loop_callq *c;
		pthread_mutex_lock(&l->call_mutex);
		c = l->calls;
		if (c) {
			l->calls = c->next;
			if (!l->calls)
				l->calls_tail = &l->calls;
		}
		pthread_mutex_unlock(&l->call_mutex);
		if (!c)
			break;
		c->fn(c->arg);
		free(c);
	}
}

static void loop_free_dead(struct loop *l)
{
	while (l->dead) {
		struct loop_watch *w = l->dead;
		l->dead = w->next_dead;
		free(w);
	}
}

int loop_run_once(struct loop *l, int timeout_ms)
{
	struct epoll_event evs[64];
	int timeout = timeout_ms, n, i;

	pthread_mutex_lock(&l->call_mutex);
	if (l->calls)
		timeout = 0;
	pthread_mutex_unlock(&l->call_mutex);
	if (timeout != 0 && l->timers) {
		uint64_t now = now_ms();
		int t = l->timers->due <= now ? 0 : (int)MIN(l->timers->due - now, 60000);
		if (timeout < 0 || t < timeout)
			timeout = t;
	}
	big_unlock();
	n = epoll_wait(l->epfd, evs, ARRAY_SIZE(evs), timeout);
	big_lock();
	if (n < 0 && errno != EINTR) {
		int e = errno;
		log_err("epoll_wait: %s", strerror(e));
		return -e;
	}
	for (i = 0; i < n; i++) {
		struct loop_watch *w = evs[i].data.ptr;
		if (!w) {
			uint64_t v;
			if (read(l->wakefd, &v, sizeof(v)) < 0 && errno != EAGAIN)
				log_warn("wake fd: %s", strerror(errno));
			continue;
		}
		if (!w->dead)
			w->fn(w->arg, evs[i].events);
	}
	loop_free_dead(l);
	loop_run_due(l);
	loop_free_dead(l);
	return n < 0 ? 0 : n;
}

static void *loop_thread(void *arg)
{
	struct loop *l = arg;

	big_lock();
	while (!l->stop)
		if (loop_run_once(l, -1) < 0)
			break;
	big_unlock();
	return NULL;
}

int loop_start(struct loop *l)
{
	int r;

	l->running = true;
	r = pthread_create(&l->thread, NULL, loop_thread, l);
	if (r) {
		l->running = false;
		return -r;
	}
	return 0;
}

void loop_stop(struct loop *l)
{
	if (!l->running)
		return;
	big_lock();
	l->stop = true;
	loop_wake(l);
	big_unlock();
	pthread_join(l->thread, NULL);
	l->running = false;
}

void loop_free(struct loop *l)
{
	if (!l)
		return;
	while (l->timers) {
		struct loop_timer *t = l->timers;
		l->timers = t->next;
		free(t);
	}
	while (l->calls) {
		struct loop_callq *c = l->calls;
		l->calls = c->next;
		free(c);
	}
	loop_free_dead(l);
	close(l->epfd);
	close(l->wakefd);
	free(l);
}
