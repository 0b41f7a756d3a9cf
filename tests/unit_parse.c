/* Unit tests for the pure parsers: numbers, values, ctl tables, console ring. */
#include "config.h"

#include <stdio.h>
#include <string.h>

#include "console.h"
#include "ctl.h"
#include "qmp.h"
#include "util.h"

static int failures, checks;

#define CHECK(cond)                                                                   \
	do {                                                                          \
		checks++;                                                             \
		if (!(cond)) {                                                        \
			failures++;                                                   \
			fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
		}                                                                     \
	} while (0)

static void test_parse_u64(void)
{
	uint64_t v = 0;

	CHECK(parse_u64("42", 2, 1, 255, &v) == 0 && v == 42);
	CHECK(parse_u64("42\n", 3, 1, 255, &v) == 0 && v == 42);
	CHECK(parse_u64("", 0, 1, 255, &v) == -EINVAL);
	CHECK(parse_u64("\n", 1, 1, 255, &v) == -EINVAL);
	CHECK(parse_u64("4 2", 3, 1, 255, &v) == -EINVAL);
	CHECK(parse_u64("-1", 2, 1, 255, &v) == -EINVAL);
	CHECK(parse_u64("+1", 2, 1, 255, &v) == -EINVAL);
	CHECK(parse_u64("0x10", 4, 1, 255, &v) == -EINVAL);
	CHECK(parse_u64("42\n\n", 4, 1, 255, &v) == -EINVAL);
	CHECK(parse_u64("256", 3, 1, 255, &v) == -ERANGE);
	CHECK(parse_u64("0", 1, 1, 255, &v) == -ERANGE);
	CHECK(parse_u64("99999999999999999999999", 23, 1, 255, &v) == -ERANGE);
	CHECK(parse_u64("99999999999999999999999x", 24, 1, 255, &v) == -EINVAL);
	CHECK(parse_u64("18446744073709551615", 20, 0, UINT64_MAX, &v) == 0 && v == UINT64_MAX);
	CHECK(parse_u64("18446744073709551616", 20, 0, UINT64_MAX, &v) == -ERANGE);
}

static void test_dup_value(void)
{
	char *s;

	s = dup_value("abc\n", 4);
	CHECK(s && strcmp(s, "abc") == 0);
	free(s);
	s = dup_value("", 0);
	CHECK(s && strcmp(s, "") == 0);
	free(s);
	CHECK(dup_value("a\nb", 3) == NULL && errno == EINVAL);
	CHECK(dup_value("a\0b", 3) == NULL && errno == EINVAL);
}

static int seen_argc;
static char seen[3][32];

static int run_cmd(void *obj, int argc, char **argv, void *ctx)
{
	int i;

	seen_argc = argc;
	for (i = 0; i < argc && i < 3; i++)
		snprintf(seen[i], sizeof(seen[i]), "%s", argv[i]);
	return 7;
}

static void test_ctl(void)
{
	static const struct ctl_cmd t[] = {
		{ "start", 0, 0, run_cmd },
		{ "listen", 1, 2, run_cmd },
	};
	char err[128];

	CHECK(ctl_run(t, 2, "start\n", 6, NULL, NULL, err, sizeof(err)) == 7 && seen_argc == 0);
	CHECK(ctl_run(t, 2, "start", 5, NULL, NULL, err, sizeof(err)) == 7);
	CHECK(ctl_run(t, 2, "  start  ", 9, NULL, NULL, err, sizeof(err)) == 7);
	CHECK(ctl_run(t, 2, "start now", 9, NULL, NULL, err, sizeof(err)) == -EINVAL);
	CHECK(strstr(err, "takes 0 arguments") != NULL);
	CHECK(ctl_run(t, 2, "listen 1024 /tmp/x.sock\n", 24, NULL, NULL, err, sizeof(err)) == 7);
	CHECK(seen_argc == 2 && strcmp(seen[0], "1024") == 0 && strcmp(seen[1], "/tmp/x.sock") == 0);
	CHECK(ctl_run(t, 2, "listen", 6, NULL, NULL, err, sizeof(err)) == -EINVAL);
	CHECK(ctl_run(t, 2, "listen 1 2 3", 12, NULL, NULL, err, sizeof(err)) == -EINVAL);
	CHECK(ctl_run(t, 2, "bogus", 5, NULL, NULL, err, sizeof(err)) == -EINVAL);
	CHECK(strstr(err, "unknown command") != NULL);
	CHECK(ctl_run(t, 2, "", 0, NULL, NULL, err, sizeof(err)) == -EINVAL);
	CHECK(ctl_run(t, 2, "\n", 1, NULL, NULL, err, sizeof(err)) == -EINVAL);
	CHECK(ctl_run(t, 2, "start\nstop\n", 11, NULL, NULL, err, sizeof(err)) == -EINVAL);
	CHECK(ctl_run(t, 2, "sta\0rt", 6, NULL, NULL, err, sizeof(err)) == -EINVAL);
	{
		char big[5000];
		memset(big, 'a', sizeof(big));
		CHECK(ctl_run(t, 2, big, sizeof(big), NULL, NULL, err, sizeof(err)) == -EINVAL);
	}
}

static void test_console(void)
{
	struct console c;
	char out[64];
	uint64_t off;
	size_t n;

	CHECK(console_init(&c, 16) == 0);
	console_append(&c, "hello ", 6);
	off = console_first(&c);
	CHECK(off == 0);
	n = console_read(&c, &off, out, sizeof(out));
	CHECK(n == 6 && memcmp(out, "hello ", 6) == 0 && off == 6);
	CHECK(console_read(&c, &off, out, sizeof(out)) == 0);
	console_append(&c, "world, this is long", 19); /* wraps: 25 bytes in a 16-byte ring */
	n = console_read(&c, &off, out, sizeof(out));
	/* the reader lost what was overwritten and resumes at the oldest byte */
	CHECK(n == 16 && memcmp(out, "ld, this is long", 16) == 0 && off == 25);
	console_boot(&c);
	CHECK(console_first(&c) == 25);
	console_append(&c, "boot2", 5);
	off = console_first(&c);
	n = console_read(&c, &off, out, 3);
	CHECK(n == 3 && memcmp(out, "boo", 3) == 0);
	console_append(&c, "0123456789abcdefXYZ", 19); /* longer than the ring */
	off = console_first(&c);
	n = console_read(&c, &off, out, sizeof(out));
	CHECK(n == 16 && memcmp(out, "3456789abcdefXYZ", 16) == 0);
	console_fini(&c);
}

static void test_qmp_fields(void)
{
	char v[64];

	CHECK(qmp_event_name("{\"timestamp\": {\"seconds\": 1}, \"event\": \"SHUTDOWN\", "
			     "\"data\": {\"guest\": true, \"reason\": \"guest-reset\"}}",
			     v, sizeof(v)) && strcmp(v, "SHUTDOWN") == 0);
	CHECK(qmp_string_field("{\"event\": \"SHUTDOWN\", \"data\": {\"reason\": \"guest-shutdown\"}}",
			       "reason", v, sizeof(v)) && strcmp(v, "guest-shutdown") == 0);
	CHECK(qmp_string_field("{\"return\": {}}", "event", v, sizeof(v)) == NULL);
	CHECK(qmp_string_field("{\"event\": 42}", "event", v, sizeof(v)) == NULL);
	CHECK(qmp_string_field("{\"event\": \"unterminated", "event", v, sizeof(v)) == NULL);
	/* a value longer than the buffer is not cut short silently */
	CHECK(qmp_string_field("{\"event\": \"ABCDEFGHIJ\"}", "event", v, 4) == NULL);
}

int main(void)
{
	test_qmp_fields();
	test_parse_u64();
	test_dup_value();
	test_ctl();
	test_console();
	printf("%d passed, %d failed\n", checks - failures, failures);
	return failures ? 1 : 0;
}
