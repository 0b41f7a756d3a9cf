#include "config.h"

#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

#include "log.h"
#include "loop.h"
#include "qmp.h"
#include "util.h"

struct qmp {
	int fd;
	struct loop_watch *w;
	const struct qmp_ops *ops;
	void *arg;
	enum { QMP_GREETING, QMP_NEGOTIATING, QMP_READY } phase;
	char buf[16384];
	size_t len;
};

const char *qmp_event_name(const char *line, char *name, size_t len)
{
	return qmp_string_field(line, "event", name, len);
}

const char *qmp_string_field(const char *line, const char *key, char *name, size_t len)
{
	char quoted[64];
	const char *p;
	size_t n = 0;

	if (len == 0 || (size_t)snprintf(quoted, sizeof(quoted), "\"%s\"", key) >= sizeof(quoted))
		return NULL;
	p = strstr(line, quoted);
	if (!p)
		return NULL;
	p += strlen(quoted);
	while (*p == ' ' || *p == ':')
		p++;
	if (*p++ != '"')
		return NULL;
	while (p[n] && p[n] != '"' && n + 1 < len) {
		name[n] = p[n];
		n++;
	}
	if (p[n] != '"')
		return NULL;
	name[n] = '\0';
	return name;
}

int qmp_execute(struct qmp *q, const char *command)
{
	char msg[256];
	int n = snprintf(msg, sizeof(msg), "{\"execute\": \"%s\"}\n", command);

	if (n < 0 || (size_t)n >= sizeof(msg))
		return -EINVAL;
	if (send(q->fd, msg, (size_t)n, MSG_NOSIGNAL | MSG_DONTWAIT) != n)
		return -errno;
	return 0;
}

static void qmp_line(struct qmp *q, char *line)
{
	char name[64];

	switch (q->phase) {
	case QMP_GREETING:
		if (strstr(line, "\"QMP\"")) {
			q->phase = QMP_NEGOTIATING;
			if (qmp_execute(q, "qmp_capabilities") < 0)
				log_warn("qmp: cannot send qmp_capabilities");
		}
		return;
	case QMP_NEGOTIATING:
		if (strstr(line, "\"return\"")) {
			q->phase = QMP_READY;
			if (q->ops->ready)
				q->ops->ready(q->arg);
			return;
		}
		break;
	case QMP_READY:
		break;
	}
	if (qmp_event_name(line, name, sizeof(name)) && q->ops->event)
		q->ops->event(q->arg, name, line);
	else if (strstr(line, "\"error\""))
		log_info("qmp: %s", line);
}

static void qmp_readable(void *arg, uint32_t events)
{
	struct qmp *q = arg;
	ssize_t n;
	char *nl;

	n = recv(q->fd, q->buf + q->len, sizeof(q->buf) - 1 - q->len, MSG_DONTWAIT);
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	if (n <= 0) {
		loop_watch_del(q->w);
		q->w = NULL;
		if (q->ops->hangup)
			q->ops->hangup(q->arg);
		return;
	}
	q->len += (size_t)n;
	q->buf[q->len] = '\0';
	while ((nl = strchr(q->buf, '\n'))) {
		*nl = '\0';
		qmp_line(q, q->buf);
		/* qmp_line may not free q: hangup only comes from here */
		q->len -= (size_t)(nl + 1 - q->buf);
		memmove(q->buf, nl + 1, q->len);
		q->buf[q->len] = '\0';
	}
	if (q->len == sizeof(q->buf) - 1) {
		log_warn("qmp: line longer than %zu bytes dropped", sizeof(q->buf));
		q->len = 0;
	}
	(void)events;
}

struct qmp *qmp_new(struct loop *l, int fd, const struct qmp_ops *ops, void *arg)
{
	struct qmp *q = calloc(1, sizeof(*q));

	if (!q)
		return NULL;
	q->fd = fd;
	q->ops = ops;
	q->arg = arg;
	q->w = loop_watch_add(l, fd, EPOLLIN, qmp_readable, q);
	if (!q->w) {
		free(q);
		return NULL;
	}
	return q;
}

void qmp_free(struct qmp *q)
{
	if (!q)
		return;
	loop_watch_del(q->w);
	close(q->fd);
	free(q);
}
