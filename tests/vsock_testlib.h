/* Harness for the vsock C tests: a host fixture (loop thread + device +
 * recording callbacks) and a guest-side stream on top of vsock_driver. */
#ifndef CAPSAFS_TESTS_VSOCK_TESTLIB_H
#define CAPSAFS_TESTS_VSOCK_TESTLIB_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "loop.h"
#include "vsock/vsock.h"
#include "vsock_driver.h"

extern int t_failures;
extern const char *t_current;

#define CHECK(cond)                                                                       \
	do {                                                                              \
		if (!(cond)) {                                                            \
			fprintf(stderr, "FAIL %s: %s:%d: %s\n", t_current, __FILE__, __LINE__, \
				#cond);                                                   \
			t_failures++;                                                     \
			return;                                                           \
		}                                                                         \
	} while (0)

#define CHECK_EQ(a, b)                                                                    \
	do {                                                                              \
		long long _a = (long long)(a), _b = (long long)(b);                       \
		if (_a != _b) {                                                           \
			fprintf(stderr, "FAIL %s: %s:%d: %s == %lld, expected %s == %lld\n",     \
				t_current, __FILE__, __LINE__, #a, _a, #b, _b);           \
			t_failures++;                                                     \
			return;                                                           \
		}                                                                         \
	} while (0)

/* Evaluate cond under the big lock until true, pumping the guest. */
#define WAIT_FOR(v, cond, ms)                                                             \
	({                                                                                \
		bool _ok = false;                                                         \
		for (int _i = 0; _i < (ms); _i++) {                                       \
			big_lock();                                                       \
			_ok = (cond);                                                     \
			big_unlock();                                                     \
			if (_ok)                                                          \
				break;                                                    \
			vd_poll_or_sleep((v));                                            \
		}                                                                         \
		_ok;                                                                      \
	})

/* deterministic test data */
static inline uint8_t gen_byte(uint32_t seed, uint64_t off)
{
	uint64_t x = (off + seed) * 0x9E3779B97F4A7C15ull;
	return (uint8_t)(x >> 56);
}
void gen_fill(uint32_t seed, uint64_t off, uint8_t *buf, size_t len);
bool gen_check(uint32_t seed, uint64_t off, const uint8_t *buf, size_t len);

/* host endpoint */
#define HOST_MAX_ACCEPT 1100 /* the host fixture refuses connections beyond this */
struct hconn {
	struct vsock_conn *c;
	bool established, closed, eof;
	int err;
	uint32_t host_port, guest_port;
	/* receiving: auto-read in the readable callback and verify */
	bool auto_read;
	uint32_t rx_seed;
	uint64_t rx_bytes;
	bool rx_bad;
	int readable_calls;
	uint32_t deliver_max; /* direct delivery: bytes taken per packet (0: none) */
	uint64_t delivered;   /* of rx_bytes, how many came that way */
	/* sending: generator driven by writable */
	uint32_t tx_seed;
	uint64_t tx_total, tx_done;
	bool tx_shut_after, tx_close_after;
	int writable_calls;
	bool close_on_closed;
};

struct host {
	struct loop *loop;
	struct vsock_dev *dev;
	char path[108];
	uint64_t cid;
	int accept_ret;
	bool accept_auto_read; /* attach an auto-reading hconn on accept */
	uint32_t accept_seed;
	uint32_t accept_deliver_max;
	struct hconn *accepted[HOST_MAX_ACCEPT];
	unsigned naccepted;
};

extern const struct vsock_conn_ops hconn_ops;

int host_start(struct host *h, unsigned max_conns);
void host_stop(struct host *h);
/* A device in its loop thread (h) with the test guest (v) attached to it. */
int fixture_open(struct host *h, struct vd *v, unsigned max_conns, const struct vd_opts *o);
void fixture_close(struct host *h, struct vd *v);
/* Start a generator send on hc (call with the big lock). */
void hconn_pump_tx(struct hconn *hc);

/* guest side stream */
struct gstream {
	uint32_t gport, hport;
	uint32_t buf_alloc, fwd_cnt, fwd_sent, rx_cnt;
	uint32_t peer_buf_alloc, peer_fwd_cnt, tx_cnt;
	bool established, rst, peer_shut_send, peer_shut_rcv;
	uint32_t shut_flags;
	uint32_t rx_seed;
	uint64_t rx_bytes;
	bool rx_bad;
	bool credit_updates; /* send CREDIT_UPDATE like Linux does */
	bool nocheck;        /* skip content verification (bench) */
	uint8_t *rx_keep;    /* optional: copy of received data */
	size_t rx_keep_cap;
};

void gs_init(struct gstream *g, uint32_t gport, uint32_t hport, uint32_t buf_alloc);
/* Route one packet to g if it is g's; returns true if consumed. */
bool gs_handle(struct vd *v, struct gstream *g, const struct vd_pkt *p);
void gs_registry_reset(void);
/* Pump packets for a set of streams (gs NULL: every stream of the test) for up to ms; unknown packets are
 * counted in *stray (may be NULL). */
void gs_pump(struct vd *v, struct gstream **gs, unsigned n, int ms, unsigned *stray);
int gs_send_ctrl(struct vd *v, struct gstream *g, uint16_t op, uint32_t flags);
/* Send len generated bytes (seed) respecting credit, rotating layouts. */
int gs_send_data(struct vd *v, struct gstream *g, uint32_t seed, uint64_t len, bool rotate);
/* Send REQUEST and wait for RESPONSE (or RST). */
int gs_connect(struct vd *v, struct gstream *g);

/* vd_poll for 1 ms, or just sleep without a guest */
void vd_poll_or_sleep(struct vd *v);

int run_test(const char *name, void (*fn)(void));

#endif
