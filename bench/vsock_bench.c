/* Device throughput and latency with the test vring driver (no QEMU, no
 * guest kernel): what the vhost-user vsock device itself costs.
 *
 *   bench/vsock_bench [seconds-per-case]        (make bench-vsock)
 *
 * Host->guest and guest->host streams at 4 KiB and 64 KiB payloads, next to
 * plain memcpy bandwidth measured in the same run (the floor: the device
 * copies each byte once into or out of guest memory, the driver once more),
 * and a 64-byte round trip (guest -> host echo -> guest) p50/p99, with the
 * driver sleeping on its call eventfd and with it polling its used ring,
 * next to an eventfd ping-pong between two threads: the cost of the two
 * wake-ups every sleeping round trip pays on this machine.  Prints a table,
 * then CSV. */
#include "config.h"

#include <errno.h>
#include <malloc.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "util.h"
#include "vsock_testlib.h"

static double secs = 1.0;
static uint8_t blob[65536];

static double now_s(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* memcpy over a working set like the benchmark's own: 128 ring buffers of
 * the payload size, so both sides see the same cache behaviour */
static double memcpy_gbs(size_t chunk)
{
	size_t total = MAX(128 * chunk, (size_t)4 << 20), iters = 0;
	uint8_t *a = malloc(total), *b = malloc(total);
	double t0, t;

	memset(a, 1, total);
	memset(b, 2, total);
	t0 = now_s();
	do {
		for (size_t off = 0; off + chunk <= total; off += chunk)
			memcpy(b + off, a + off, chunk);
		iters++;
		__asm__ volatile("" ::: "memory");
		t = now_s();
	} while (t - t0 < secs / 2);
	free(a);
	free(b);
	return (double)(iters * total) / (t - t0) / 1e9;
}

/* ---- host side: source / sink / echo endpoints (loop thread) ---- */

struct bep {
	struct vsock_conn *c;
	int mode; /* 0 source, 1 sink, 2 echo */
	uint64_t bytes;
	bool stop;
};

static void bep_pump(struct bep *e)
{
	while (e->mode == 0 && !e->stop) {
		ssize_t n = vsock_conn_write(e->c, blob, sizeof(blob));
		if (n <= 0)
			return;
		e->bytes += (uint64_t)n;
	}
}

static void bep_readable(struct vsock_conn *c, void *arg)
{
	struct bep *e = arg;
	static uint8_t buf[65536];
	ssize_t n;

	while ((n = vsock_conn_read(c, buf, sizeof(buf))) > 0) {
		e->bytes += (uint64_t)n;
		if (e->mode == 2)
			vsock_conn_write(c, buf, (size_t)n);
	}
}

static void bep_writable(struct vsock_conn *c, void *arg)
{
	bep_pump(arg);
}

/* The sink takes data as it arrives, like a host socket reader that reads
 * into its own buffer: one copy out of guest memory. */
static size_t bep_deliver(struct vsock_conn *c, void *arg, const struct iovec *iov, int cnt,
			  size_t len)
{
	static uint8_t buf[65536];
	struct bep *e = arg;
	size_t done = 0;

	if (e->mode != 1)
		return 0;
	for (int i = 0; i < cnt; i++) {
		size_t n = MIN(iov[i].iov_len, sizeof(buf));
		memcpy(buf, iov[i].iov_base, n);
		done += n;
		if (n < iov[i].iov_len)
			break;
	}
	e->bytes += done;
	return done;
}

static const struct vsock_conn_ops bep_ops = {
	.readable = bep_readable,
	.writable = bep_writable,
	.deliver = bep_deliver,
};

static struct bep *cur_ep;

static int bench_accept(void *arg, struct vsock_conn *c, uint32_t hp, uint32_t gp)
{
	cur_ep->c = c;
	cur_ep->mode = hp == 1 ? 0 : hp == 2 ? 1 : 2;
	vsock_conn_set_ops(c, &bep_ops, cur_ep);
	return 0;
}

/* CPU time the loop thread (device plus host endpoint) has used: how busy
 * the device was, and so what it could move if it were the bottleneck. */
struct cpu_probe {
	double s;
	int done;
};

static void cpu_probe_fn(void *arg)
{
	struct cpu_probe *p = arg;
	struct timespec t;

	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
	p->s = (double)t.tv_sec + (double)t.tv_nsec / 1e9;
	__atomic_store_n(&p->done, 1, __ATOMIC_RELEASE);
}

static double loop_cpu_s(struct loop *l)
{
	struct cpu_probe p = { 0, 0 };

	if (loop_call(l, cpu_probe_fn, &p) < 0)
		return 0;
	while (!__atomic_load_n(&p.done, __ATOMIC_ACQUIRE))
		usleep(20);
	return p.s;
}

/* ---- the cases ---- */

struct fixture {
	struct loop *loop;
	struct vsock_dev *dev;
	char path[108];
	struct vd v;
};

static int fx_open(struct fixture *f, unsigned rx_buf)
{
	struct vsock_dev_config cfg = { 0 };
	struct vd_opts o = { .event_idx = true, .indirect = true, .rx_buf_size = rx_buf,
			     .qsize = 128 };

	snprintf(f->path, sizeof(f->path), "/tmp/vsock-bench-%d.sock", getpid());
	f->loop = loop_new();
	cfg.guest_cid = 3;
	cfg.socket_path = f->path;
	cfg.accept = bench_accept;
	big_lock();
	f->dev = vsock_dev_new(f->loop, &cfg);
	big_unlock();
	if (!f->dev || loop_start(f->loop) < 0)
		return -1;
	return vd_open(&f->v, f->path, &o);
}

static void fx_close(struct fixture *f)
{
	vd_close(&f->v);
	big_lock();
	if (cur_ep->c)
		vsock_conn_close(cur_ep->c);
	cur_ep->c = NULL;
	vsock_dev_free(f->dev);
	big_unlock();
	loop_stop(f->loop);
	loop_free(f->loop);
	unlink(f->path);
}

/* host -> guest: guest rx buffers of payload+44 bytes, 1 MiB guest buf_alloc */
static double run_h2g(uint32_t payload, double *busy)
{
	struct fixture f;
	struct bep e = { 0 };
	struct gstream g;
	double t0, t;
	uint64_t start;

	cur_ep = &e;
	if (fx_open(&f, payload + VD_HDR) < 0)
		return -1;
	gs_registry_reset();
	gs_init(&g, 5000, 1, 1u << 20);
	g.nocheck = true;
	if (gs_connect(&f.v, &g) < 0)
		return -1;
	big_lock();
	bep_pump(&e);
	big_unlock();
	/* warm up, then measure what the guest receives */
	t0 = now_s();
	while (now_s() - t0 < 0.2)
		gs_pump(&f.v, NULL, 0, 1, NULL);
	start = g.rx_bytes;
	double c0 = loop_cpu_s(f.loop);
	t0 = now_s();
	do {
		gs_pump(&f.v, NULL, 0, 1, NULL);
		t = now_s();
	} while (t - t0 < secs);
	*busy = (loop_cpu_s(f.loop) - c0) / (now_s() - t0);
	big_lock();
	e.stop = true;
	big_unlock();
	double mbs = (double)(g.rx_bytes - start) / (t - t0) / 1e6;
	fx_close(&f);
	return mbs;
}

/* guest -> host: packets of payload bytes (header + payload descriptors) */
static double run_g2h(uint32_t payload, double *busy)
{
	struct fixture f;
	struct bep e = { 0 };
	struct gstream g;
	double t0 = 0, t;
	uint64_t start = 0;
	bool measuring = false;
	double c0 = 0;

	cur_ep = &e;
	if (fx_open(&f, 4096) < 0)
		return -1;
	gs_registry_reset();
	gs_init(&g, 5001, 2, 1u << 20);
	if (gs_connect(&f.v, &g) < 0)
		return -1;
	double w0 = now_s();
	for (;;) {
		uint32_t inflight = g.tx_cnt - g.peer_fwd_cnt;
		uint32_t credit = inflight >= g.peer_buf_alloc ? 0 : g.peer_buf_alloc - inflight;
		t = now_s();
		if (!measuring && t - w0 > 0.2) {
			measuring = true;
			c0 = loop_cpu_s(f.loop);
			t0 = t;
			big_lock();
			start = e.bytes;
			big_unlock();
		}
		if (measuring && t - t0 >= secs) {
			*busy = (loop_cpu_s(f.loop) - c0) / (now_s() - t0);
			break;
		}
		if (credit >= payload) {
			struct virtio_vsock_hdr h;
			vd_hdr(&f.v, &h, g.gport, g.hport, VIRTIO_VSOCK_OP_RW, payload, g.buf_alloc,
			       g.fwd_cnt);
			if (vd_send(&f.v, &h, blob, payload, VD_HDR_PAYLOAD) < 0)
				break;
			g.tx_cnt += payload;
			gs_pump(&f.v, NULL, 0, 0, NULL);
		} else {
			gs_pump(&f.v, NULL, 0, 1, NULL);
		}
	}
	big_lock();
	double mbs = (double)(e.bytes - start) / (t - t0) / 1e6;
	big_unlock();
	fx_close(&f);
	return mbs;
}

static int cmp_d(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

/* How long a wake-up between two threads takes on this machine: an eventfd
 * ping-pong, both sides sleeping in poll.  A round trip through the device
 * sleeps and wakes like this twice (guest kick -> device thread, device call
 * -> guest), so this is its floor here. */
static int pp_fd[2];

static void *pp_echo(void *arg)
{
	struct pollfd p = { pp_fd[0], POLLIN, 0 };
	uint64_t v;

	for (;;) {
		poll(&p, 1, -1);
		if (read(pp_fd[0], &v, 8) != 8)
			continue;
		if (v == 2)
			return NULL;
		v = 1;
		if (write(pp_fd[1], &v, 8) != 8)
			return NULL;
	}
}

static void run_pingpong(double *p50, double *p99)
{
	enum { N = 20000 };
	static double lat[N];
	pthread_t t;
	uint64_t v;

	pp_fd[0] = eventfd(0, EFD_NONBLOCK);
	pp_fd[1] = eventfd(0, EFD_NONBLOCK);
	pthread_create(&t, NULL, pp_echo, NULL);
	for (unsigned i = 0; i < N; i++) {
		struct pollfd p = { pp_fd[1], POLLIN, 0 };
		double t0 = now_s();
		v = 1;
		if (write(pp_fd[0], &v, 8) != 8)
			break;
		while (read(pp_fd[1], &v, 8) != 8)
			poll(&p, 1, 1000);
		lat[i] = (now_s() - t0) * 1e6;
	}
	v = 2;
	if (write(pp_fd[0], &v, 8) != 8) {
	}
	pthread_join(t, NULL);
	close(pp_fd[0]);
	close(pp_fd[1]);
	qsort(lat, N, sizeof(lat[0]), cmp_d);
	*p50 = lat[N / 2];
	*p99 = lat[(size_t)(N * 0.99)];
}

/* poll: the driver spins on its used ring instead of sleeping on the call
 * eventfd (a busy guest, or busy polling); the device thread still sleeps in
 * epoll between packets. */
static int run_rtt(bool poll_mode, double *p50, double *p99, unsigned *count)
{
	enum { MAXN = 200000 };
	static double lat[MAXN];
	struct fixture f;
	struct bep e = { 0 };
	struct gstream g;
	unsigned n = 0;
	double t_end;

	cur_ep = &e;
	if (fx_open(&f, 4096) < 0)
		return -1;
	gs_registry_reset();
	gs_init(&g, 5002, 3, 1u << 20);
	g.nocheck = true;
	if (gs_connect(&f.v, &g) < 0)
		return -1;
	t_end = now_s() + secs + 0.2;
	for (unsigned i = 0; n < MAXN && now_s() < t_end; i++) {
		struct virtio_vsock_hdr h;
		uint64_t want = g.rx_bytes + 64;
		double t0 = now_s();
		vd_hdr(&f.v, &h, g.gport, g.hport, VIRTIO_VSOCK_OP_RW, 64, g.buf_alloc, g.fwd_cnt);
		if (vd_send(&f.v, &h, blob, 64, VD_ONE) < 0)
			return -1;
		g.tx_cnt += 64;
		while (g.rx_bytes < want)
			gs_pump(&f.v, NULL, 0, poll_mode ? 0 : 1, NULL);
		if (i >= 200) /* warm-up */
			lat[n++] = (now_s() - t0) * 1e6;
	}
	fx_close(&f);
	qsort(lat, n, sizeof(lat[0]), cmp_d);
	*p50 = lat[n / 2];
	*p99 = lat[(size_t)(n * 0.99)];
	*count = n;
	return 0;
}

int main(int argc, char **argv)
{
	static const uint32_t sizes[] = { 4096, 65536 };
	double mc[2], h2g[2], g2h[2], bh[2] = { 0 }, bg[2] = { 0 }, p50 = 0, p99 = 0, q50 = 0, q99 = 0, w50 = 0, w99 = 0;
	unsigned rtts = 0, qtts = 0;

	if (argc > 1)
		secs = atof(argv[1]);
	if (secs <= 0)
		secs = 1.0;
	signal(SIGPIPE, SIG_IGN);
	log_verbosity = LOG_ERR;
	/* the test driver mallocs a copy of every received packet; keep glibc
	 * from trimming and re-faulting the heap for each 64 KiB one, which
	 * would measure page faults instead of the device */
	mallopt(M_TRIM_THRESHOLD, 256 << 20);
	mallopt(M_MMAP_THRESHOLD, 4 << 20);
	memset(blob, 0x5a, sizeof(blob));
	for (int i = 0; i < 2; i++) {
		mc[i] = memcpy_gbs(sizes[i]) * 1000; /* MB/s */
		h2g[i] = run_h2g(sizes[i], &bh[i]);
		g2h[i] = run_g2h(sizes[i], &bg[i]);
	}
	run_rtt(false, &p50, &p99, &rtts);
	run_rtt(true, &q50, &q99, &qtts);
	run_pingpong(&w50, &w99);

	printf("vhost-user vsock device bench (test vring driver, queue 128, EVENT_IDX, %.1f s/case)\n",
	       secs);
	printf("%-10s %14s %14s %14s %10s %10s\n", "payload", "memcpy MB/s", "host->guest",
	       "guest->host", "h2g/memcpy", "g2h/memcpy");
	for (int i = 0; i < 2; i++)
		printf("%-10s %14.0f %10.0f MB/s %10.0f MB/s %9.1f%% %9.1f%%\n",
		       i ? "64 KiB" : "4 KiB", mc[i], h2g[i], g2h[i], 100 * h2g[i] / mc[i],
		       100 * g2h[i] / mc[i]);
	printf("device thread (device + host endpoint) busy, and what it moves per CPU-second:\n");
	for (int i = 0; i < 2; i++)
		printf("%-10s host->guest %3.0f%% busy, %6.0f MB/CPU-s (%4.1f%% of memcpy)   "
		       "guest->host %3.0f%% busy, %6.0f MB/CPU-s (%4.1f%% of memcpy)\n",
		       i ? "64 KiB" : "4 KiB", 100 * bh[i], h2g[i] / bh[i],
		       100 * h2g[i] / bh[i] / mc[i], 100 * bg[i], g2h[i] / bg[i],
		       100 * g2h[i] / bg[i] / mc[i]);
	printf("64 B round trip, guest -> host echo -> guest:\n");
	printf("  driver sleeps on its call eventfd   p50 %6.1f us  p99 %6.1f us  (%u)\n", p50, p99,
	       rtts);
	printf("  driver polls its used ring          p50 %6.1f us  p99 %6.1f us  (%u)\n", q50, q99,
	       qtts);
	printf("  floor: eventfd ping-pong, 2 threads p50 %6.1f us  p99 %6.1f us  (this machine's"
	       " wake-up cost, twice)\n", w50, w99);
	printf("\ncsv:\nmetric,payload_bytes,value,unit\n");
	for (int i = 0; i < 2; i++) {
		printf("memcpy,%u,%.0f,MB/s\n", sizes[i], mc[i]);
		printf("host_to_guest,%u,%.0f,MB/s\n", sizes[i], h2g[i]);
		printf("guest_to_host,%u,%.0f,MB/s\n", sizes[i], g2h[i]);
		printf("host_to_guest_device_busy,%u,%.2f,fraction\n", sizes[i], bh[i]);
		printf("guest_to_host_device_busy,%u,%.2f,fraction\n", sizes[i], bg[i]);
	}
	printf("rtt_p50,64,%.1f,us\nrtt_p99,64,%.1f,us\n", p50, p99);
	printf("rtt_poll_p50,64,%.1f,us\nrtt_poll_p99,64,%.1f,us\n", q50, q99);
	printf("eventfd_pingpong_p50,8,%.1f,us\neventfd_pingpong_p99,8,%.1f,us\n", w50, w99);
	return 0;
}
