/* capsafs-mkinitrd: build the small initramfs a capsafs guest boots from.
 *
 * The archive holds a static busybox, socat with its shared libraries, the
 * kernel modules virtio-pci, virtio-console, virtio-net and virtio-vsock need
 * (their dependency closure resolved with libkmod from the kernel's own
 * modules.dep) and a generated /init.  The newc cpio stream is written here
 * and compressed by piping it through `gzip -9n`; every entry has mtime 0 and
 * uid/gid 0, so the same inputs give the same image. */
#include "config.h"

#include <elf.h>
#include <fcntl.h>
#include <getopt.h>
#include <libkmod.h>
#include <signal.h>
#include <stdarg.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <sys/wait.h>

#include "util.h"

#define PROG "capsafs-mkinitrd"

/* What the default guest needs: the transports and devices capsafs gives it. */
static const char *const default_modules[] = {
    "virtio_pci",
    "virtio_console",
    "virtio_net",
    "vmw_vsock_virtio_transport",
    /* the ACPI power button, so capsafs' "stop" (QMP system_powerdown) works */
    "button",
    "evdev",
};

/* Applets /init itself runs; the image gets a link for every applet anyway. */
static const char *const required_applets[] = {
    "sh", "mount", "insmod", "init", "setsid", "cttyhack", "poweroff", "sed", "printf", "cat", "ip", "head", "usleep",
};

static int verbose;

static void __attribute__((format(printf, 1, 2))) error(const char *fmt, ...)
{
	int saved = errno; /* for %m */
	va_list ap;

	va_start(ap, fmt);
	fprintf(stderr, PROG ": error: ");
	errno = saved;
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
}

static const char *human(uint64_t n, char buf[static 32])
{
	if (n >= 1024 * 1024)
		snprintf(buf, 32, "%.1f MiB", n / (1024.0 * 1024.0));
	else if (n >= 1024)
		snprintf(buf, 32, "%.1f KiB", n / 1024.0);
	else
		snprintf(buf, 32, "%u B", (unsigned)n);
	return buf;
}

/* ---- helper programs ---------------------------------------------------- */

/* Run argv, collect its stdout (NUL-terminated) in *out.  Returns the exit
 * status (0..255), or -1 with a message if it could not run at all. */
static int run_capture(char *const argv[], char **out, size_t *outlen)
{
	__do_close int rd = -1;
	__do_free char *buf = NULL;
	size_t len = 0, cap = 0;
	int fds[2], status;
	bool oom = false;
	pid_t pid;

	if (pipe2(fds, O_CLOEXEC) < 0) {
		error("pipe: %m");
		return -1;
	}
	pid = fork();
	if (pid < 0) {
		error("fork: %m");
		close(fds[0]);
		close(fds[1]);
		return -1;
	}
	if (pid == 0) {
		dup2(fds[1], STDOUT_FILENO);
		execvp(argv[0], argv);
		fprintf(stderr, PROG ": error: cannot run %s: %m\n", argv[0]);
		_exit(127);
	}
	close(fds[1]);
	rd = fds[0];
	for (;;) {
		ssize_t n;
		if (cap - len < 65536) {
			char *p = realloc(buf, cap + 262144);
			if (!p) {
				oom = true;
				break;
			}
			buf = p;
			cap += 262144;
		}
		n = read(rd, buf + len, cap - len - 1);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		len += (size_t)n;
	}
	close(move_fd(rd));
	while (waitpid(pid, &status, 0) < 0)
		if (errno != EINTR)
			return -1;
	if (oom || !buf) {
		error("out of memory reading the output of %s", argv[0]);
		return -1;
	}
	buf[len] = '\0';
	*out = move_ptr(buf);
	if (outlen)
		*outlen = len;
	return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

/* ---- newc cpio writer ---------------------------------------------------- */

struct archive {
	int fd; /* pipe into gzip */
	pid_t gzip;
	uint32_t ino;
	uint64_t bytes; /* uncompressed */
	unsigned entries;
	char **dirs; /* directories already written */
	size_t ndirs;
};

static int archive_open(struct archive *a, int outfd)
{
	int fds[2];

	memset(a, 0, sizeof(*a));
	a->fd = -1;
	if (pipe2(fds, O_CLOEXEC) < 0) {
		error("pipe: %m");
		return -1;
	}
	a->gzip = fork();
	if (a->gzip < 0) {
		error("fork: %m");
		close(fds[0]);
		close(fds[1]);
		return -1;
	}
	if (a->gzip == 0) {
		dup2(fds[0], STDIN_FILENO);
		dup2(outfd, STDOUT_FILENO);
		execlp("gzip", "gzip", "-9n", (char *)NULL);
		fprintf(stderr, PROG ": error: cannot run gzip: %m\n");
		_exit(127);
	}
	close(fds[0]);
	a->fd = fds[1];
	a->ino = 1;
	return 0;
}

static int archive_write(struct archive *a, const void *buf, size_t len)
{
	int r = write_all(a->fd, buf, len);

	if (r < 0) {
		error("writing to gzip: %s", strerror(-r));
		return -1;
	}
	a->bytes += len;
	return 0;
}

static int archive_pad(struct archive *a)
{
	static const char zeros[4];

	return archive_write(a, zeros, (4 - a->bytes % 4) % 4);
}

static int archive_header(struct archive *a, const char *name, mode_t mode, uint32_t size,
			  unsigned rmajor, unsigned rminor)
{
	char hdr[111];
	size_t namesize = strlen(name) + 1;

	snprintf(hdr, sizeof(hdr), "070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		 a->ino++, (unsigned)mode, 0u, 0u, S_ISDIR(mode) ? 2u : 1u, 0u, size, 0u, 0u,
		 rmajor, rminor, (unsigned)namesize, 0u);
	if (verbose > 1 && strcmp(name, "TRAILER!!!") != 0)
		printf("  %06o %9u /%s\n", (unsigned)mode, size, name);
	a->entries++;
	if (archive_write(a, hdr, 110) < 0 || archive_write(a, name, namesize) < 0)
		return -1;
	return archive_pad(a);
}

static bool archive_has_dir(struct archive *a, const char *name)
{
	for (size_t i = 0; i < a->ndirs; i++)
		if (strcmp(a->dirs[i], name) == 0)
			return true;
	return false;
}

static int archive_add_parents(struct archive *a, const char *name);

static int archive_add_dir(struct archive *a, const char *name, mode_t perm)
{
	char **v;

	if (archive_has_dir(a, name))
		return 0;
	if (archive_add_parents(a, name) < 0)
		return -1;
	v = realloc(a->dirs, (a->ndirs + 1) * sizeof(*v));
	if (!v || !(v[a->ndirs] = strdup(name))) {
		error("out of memory");
		if (v)
			a->dirs = v;
		return -1;
	}
	a->dirs = v;
	a->ndirs++;
	return archive_header(a, name, S_IFDIR | perm, 0, 0, 0);
}

/* The kernel's initramfs unpacker does not create missing parents. */
static int archive_add_parents(struct archive *a, const char *name)
{
	char buf[4096];

	if (strlen(name) >= sizeof(buf)) {
		error("%s: path too long", name);
		return -1;
	}
	strcpy(buf, name);
	for (char *p = strchr(buf, '/'); p; p = strchr(p + 1, '/')) {
		*p = '\0';
		if (archive_add_dir(a, buf, 0755) < 0)
			return -1;
		*p = '/';
	}
	return 0;
}

static int archive_add_data(struct archive *a, const char *name, mode_t perm, const void *data,
			    size_t len)
{
	if (len > UINT32_MAX) {
		error("%s: too large for a newc archive", name);
		return -1;
	}
	if (archive_add_parents(a, name) < 0 ||
	    archive_header(a, name, S_IFREG | perm, len, 0, 0) < 0 ||
	    archive_write(a, data, len) < 0)
		return -1;
	return archive_pad(a);
}

/* Copy a host file (symlinks followed) into the archive; *size gets its size. */
static int archive_add_file(struct archive *a, const char *name, mode_t perm, const char *src,
			    uint64_t *size)
{
	__do_close int fd = open(src, O_RDONLY | O_CLOEXEC);
	char buf[65536];
	struct stat st;
	uint64_t left;

	if (fd < 0 || fstat(fd, &st) < 0) {
		error("cannot read %s: %m", src);
		return -1;
	}
	if (!S_ISREG(st.st_mode) || st.st_size > UINT32_MAX) {
		error("%s: not a regular file small enough for a newc archive", src);
		return -1;
	}
	if (archive_add_parents(a, name) < 0 ||
	    archive_header(a, name, S_IFREG | perm, (uint32_t)st.st_size, 0, 0) < 0)
		return -1;
	for (left = (uint64_t)st.st_size; left > 0;) {
		ssize_t n = read(fd, buf, MIN(sizeof(buf), left));
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			error("%s: %s while reading", src, n < 0 ? strerror(errno) : "file shrank");
			return -1;
		}
		if (archive_write(a, buf, (size_t)n) < 0)
			return -1;
		left -= (uint64_t)n;
	}
	if (size)
		*size = (uint64_t)st.st_size;
	return archive_pad(a);
}

static int archive_add_symlink(struct archive *a, const char *name, const char *target)
{
	size_t len = strlen(target);

	if (archive_add_parents(a, name) < 0 ||
	    archive_header(a, name, S_IFLNK | 0777, len, 0, 0) < 0 ||
	    archive_write(a, target, len) < 0)
		return -1;
	return archive_pad(a);
}

static int archive_add_node(struct archive *a, const char *name, mode_t mode, unsigned maj,
			    unsigned min)
{
	if (archive_add_parents(a, name) < 0)
		return -1;
	return archive_header(a, name, mode, 0, maj, min);
}

/* Write the trailer, let gzip finish; 0 only if gzip succeeded. */
static int archive_close(struct archive *a, bool ok)
{
	int status;

	if (ok && archive_header(a, "TRAILER!!!", 0, 0, 0, 0) < 0)
		ok = false;
	if (a->fd >= 0)
		close(a->fd);
	a->fd = -1;
	while (waitpid(a->gzip, &status, 0) < 0)
		if (errno != EINTR) {
			status = -1;
			break;
		}
	for (size_t i = 0; i < a->ndirs; i++)
		free(a->dirs[i]);
	free(a->dirs);
	a->dirs = NULL;
	if (ok && !(WIFEXITED(status) && WEXITSTATUS(status) == 0)) {
		error("gzip failed");
		return -1;
	}
	return ok ? 0 : -1;
}

/* ---- ELF ---------------------------------------------------------------- */

/* 1 if path is a dynamically linked ELF executable (has PT_INTERP), 0 if
 * static, -1 (with a message) if it is not a usable ELF file. */
static int elf_is_dynamic(const char *path)
{
	__do_close int fd = open(path, O_RDONLY | O_CLOEXEC);
	unsigned char ident[EI_NIDENT];
	uint64_t phoff;
	unsigned phnum, phentsize;

	if (fd < 0) {
		error("cannot open %s: %m", path);
		return -1;
	}
	if (pread(fd, ident, sizeof(ident), 0) != sizeof(ident) ||
	    memcmp(ident, ELFMAG, SELFMAG) != 0) {
		error("%s: not an ELF executable", path);
		return -1;
	}
	if (ident[EI_CLASS] == ELFCLASS64) {
		Elf64_Ehdr eh;
		if (pread(fd, &eh, sizeof(eh), 0) != sizeof(eh))
			goto bad;
		phoff = eh.e_phoff, phnum = eh.e_phnum, phentsize = eh.e_phentsize;
	} else {
		Elf32_Ehdr eh;
		if (pread(fd, &eh, sizeof(eh), 0) != sizeof(eh))
			goto bad;
		phoff = eh.e_phoff, phnum = eh.e_phnum, phentsize = eh.e_phentsize;
	}
	for (unsigned i = 0; i < phnum; i++) {
		uint32_t type; /* p_type is the first word in both classes */
		if (pread(fd, &type, sizeof(type), (off_t)(phoff + (uint64_t)i * phentsize)) !=
		    sizeof(type))
			goto bad;
		if (type == PT_INTERP)
			return 1;
	}
	return 0;
bad:
	error("%s: truncated ELF file", path);
	return -1;
}

/* ---- modules ------------------------------------------------------------ */

enum { MOD_VISITING, MOD_DONE };

struct module {
	char *name;
	char *path; /* on the host */
	char *rel;  /* below /lib/modules/KVER in the guest, always *.ko */
	int state;
	struct kmod_module *kmod;
};

struct modules {
	struct kmod_ctx *ctx;
	const char *dir;  /* MODROOT/lib/modules/KVER */
	struct module *v; /* in discovery order */
	size_t n;
	size_t *order; /* indexes into v, dependencies first */
	size_t norder;
	char **builtin; /* names found built into the kernel */
	size_t nbuiltin;
};

static ssize_t modules_find(const struct modules *m, const char *name)
{
	for (size_t i = 0; i < m->n; i++)
		if (strcmp(m->v[i].name, name) == 0)
			return (ssize_t)i;
	return -1;
}

static void modules_note_builtin(struct modules *m, const char *name)
{
	char **v;

	for (size_t i = 0; i < m->nbuiltin; i++)
		if (strcmp(m->builtin[i], name) == 0)
			return;
	v = realloc(m->builtin, (m->nbuiltin + 1) * sizeof(*v));
	if (!v)
		return;
	m->builtin = v;
	if ((v[m->nbuiltin] = strdup(name)))
		m->nbuiltin++;
}

/* Guest path of a module: its path relative to the module dir, with any
 * compression suffix dropped because the guest gets it decompressed. */
static char *module_rel_path(const char *dir, const char *path)
{
	size_t dl = strlen(dir);
	const char *base = strrchr(path, '/');
	char *r, *ko;

	if (strncmp(path, dir, dl) == 0 && path[dl] == '/')
		r = strdup(path + dl + 1);
	else if (asprintf(&r, "extra/%s", base ? base + 1 : path) < 0) /* absolute in modules.dep */
		r = NULL;
	if (!r)
		return NULL;
	base = strrchr(r, '/');
	ko = strstr(base ? base : r, ".ko.");
	if (ko)
		ko[3] = '\0';
	return r;
}

/* Depth-first: every dependency is appended to the order before its user. */
static int modules_visit(struct modules *m, struct kmod_module *mod)
{
	const char *name = kmod_module_get_name(mod);
	const char *path;
	struct kmod_list *deps, *l;
	struct module *e;
	size_t *order;
	ssize_t i = modules_find(m, name);
	size_t idx;
	int r = 0;

	if (i >= 0) {
		if (m->v[i].state == MOD_DONE)
			return 0;
		error("dependency cycle through module %s", name);
		return -1;
	}
	/* A file in modules.dep first: libkmod's initstate may look at the host's
	 * /sys/module, which says nothing about the target kernel. */
	path = kmod_module_get_path(mod);
	if (!path) {
		if (kmod_module_get_initstate(mod) == KMOD_MODULE_BUILTIN) {
			modules_note_builtin(m, name);
			return 0;
		}
		error("module %s is neither built in nor listed in %s/modules.dep", name, m->dir);
		return -1;
	}
	order = realloc(m->order, (m->n + 1) * sizeof(*order));
	if (!order)
		goto oom;
	m->order = order;
	e = realloc(m->v, (m->n + 1) * sizeof(*e));
	if (!e)
		goto oom;
	m->v = e;
	idx = m->n;
	e = &m->v[idx];
	memset(e, 0, sizeof(*e));
	e->name = strdup(name);
	e->path = strdup(path);
	e->rel = module_rel_path(m->dir, path);
	e->state = MOD_VISITING;
	e->kmod = kmod_module_ref(mod);
	m->n++;
	if (!e->name || !e->path || !e->rel)
		goto oom;

	deps = kmod_module_get_dependencies(mod);
	kmod_list_foreach (l, deps) {
		struct kmod_module *dep = kmod_module_get_module(l); /* a new reference */
		r = modules_visit(m, dep);
		kmod_module_unref(dep);
		if (r < 0)
			break;
	}
	kmod_module_unref_list(deps);
	if (r < 0)
		return -1;

	m->v[idx].state = MOD_DONE;
	m->order[m->norder++] = idx;
	return 0;
oom:
	error("out of memory");
	return -1;
}

static int modules_add(struct modules *m, const char *name)
{
	struct kmod_list *list = NULL, *l;
	int r;

	r = kmod_module_new_from_lookup(m->ctx, name, &list);
	if (r < 0) {
		error("looking up module %s: %s", name, strerror(-r));
		return -1;
	}
	if (!list) {
		error("unknown module %s: not in %s (modules.dep, modules.builtin, modules.alias)",
		      name, m->dir);
		return -1;
	}
	r = 0;
	kmod_list_foreach (l, list) {
		struct kmod_module *mod = kmod_module_get_module(l);
		r = modules_visit(m, mod);
		kmod_module_unref(mod);
		if (r < 0)
			break;
	}
	kmod_module_unref_list(list);
	return r;
}

static void modules_free(struct modules *m)
{
	for (size_t i = 0; i < m->n; i++) {
		free(m->v[i].name);
		free(m->v[i].path);
		free(m->v[i].rel);
		kmod_module_unref(m->v[i].kmod);
	}
	for (size_t i = 0; i < m->nbuiltin; i++)
		free(m->builtin[i]);
	free(m->v);
	free(m->order);
	free(m->builtin);
	if (m->ctx)
		kmod_unref(m->ctx);
}

/* Add one module, decompressing .ko.{gz,xz,zst} on the host: the guest's
 * busybox insmod only takes plain ELF objects. */
static int add_module(struct archive *a, const char *kver, const struct module *mod, uint64_t *size)
{
	static const struct {
		const char *suffix, *tool;
	} unpack[] = {{".ko.gz", "gzip"}, {".ko.xz", "xz"}, {".ko.zst", "zstd"}};
	__do_free char *name = NULL;
	size_t pl = strlen(mod->path);

	if (asprintf(&name, "lib/modules/%s/%s", kver, mod->rel) < 0)
		return -1;
	if (pl > 3 && strcmp(mod->path + pl - 3, ".ko") == 0)
		return archive_add_file(a, name, 0644, mod->path, size);
	for (size_t i = 0; i < ARRAY_SIZE(unpack); i++) {
		size_t sl = strlen(unpack[i].suffix);
		__do_free char *data = NULL;
		size_t len;
		int st;
		if (pl <= sl || strcmp(mod->path + pl - sl, unpack[i].suffix) != 0)
			continue;
		st = run_capture((char *const[]){(char *)unpack[i].tool, "-dc", mod->path, NULL},
				 &data, &len);
		if (st != 0) {
			error("cannot decompress %s with %s -dc (is %s installed?)", mod->path,
			      unpack[i].tool, unpack[i].tool);
			return -1;
		}
		*size = len;
		return archive_add_data(a, name, 0644, data, len);
	}
	error("%s: unsupported module file name (want .ko, .ko.gz, .ko.xz or .ko.zst)", mod->path);
	return -1;
}

/* A modules.dep for the guest's own subset, so busybox modprobe works there.
 * Like depmod's, each line lists the full closure, users before providers. */
static char *modules_guest_dep(const struct modules *m)
{
	__do_free char *buf = NULL;
	size_t len = 0;
	FILE *f = open_memstream(&buf, &len);

	if (!f)
		return NULL;
	for (size_t k = 0; k < m->norder; k++) {
		const struct module *mod = &m->v[m->order[k]];
		__do_free bool *need = calloc(m->n, sizeof(*need));
		struct kmod_list *deps, *l;

		if (!need) {
			fclose(f);
			return NULL;
		}
		deps = kmod_module_get_dependencies(mod->kmod);
		kmod_list_foreach (l, deps) {
			struct kmod_module *d = kmod_module_get_module(l);
			ssize_t i = modules_find(m, kmod_module_get_name(d));
			if (i >= 0)
				need[i] = true;
			kmod_module_unref(d);
		}
		kmod_module_unref_list(deps);
		fprintf(f, "%s:", mod->rel);
		for (size_t j = m->norder; j-- > 0;)
			if (need[m->order[j]])
				fprintf(f, " %s", m->v[m->order[j]].rel);
		fputc('\n', f);
	}
	if (fclose(f) != 0)
		return NULL;
	return move_ptr(buf);
}

/* ---- programs ----------------------------------------------------------- */

static bool has_line(const char *text, const char *line)
{
	size_t len = strlen(line);

	for (const char *p = text; (p = strstr(p, line)); p += len)
		if ((p == text || p[-1] == '\n') && (p[len] == '\n' || p[len] == '\0'))
			return true;
	return false;
}

static int add_busybox(struct archive *a, const char *busybox, uint64_t *size, unsigned *napplets)
{
	__do_free char *list = NULL;
	char *save = NULL;
	int dyn = elf_is_dynamic(busybox);

	if (dyn < 0)
		return -1;
	if (dyn) {
		error("%s is dynamically linked; the guest needs a static busybox "
		      "(apt-get install busybox-static)",
		      busybox);
		return -1;
	}
	if (run_capture((char *const[]){(char *)busybox, "--list", NULL}, &list, NULL) != 0) {
		error("%s --list failed: is it a busybox?", busybox);
		return -1;
	}
	for (size_t i = 0; i < ARRAY_SIZE(required_applets); i++) {
		if (!has_line(list, required_applets[i])) {
			error("%s lacks the applet %s that /init needs", busybox,
			      required_applets[i]);
			return -1;
		}
	}
	if (archive_add_file(a, "bin/busybox", 0755, busybox, size) < 0)
		return -1;
	*napplets = 0;
	for (char *t = strtok_r(list, "\n", &save); t; t = strtok_r(NULL, "\n", &save)) {
		__do_free char *name = NULL;
		if (!*t || strchr(t, '/') || strcmp(t, "busybox") == 0)
			continue;
		if (asprintf(&name, "bin/%s", t) < 0 || archive_add_symlink(a, name, "busybox") < 0)
			return -1;
		(*napplets)++;
	}
	return archive_add_symlink(a, "usr/bin/env", "/bin/busybox");
}

/* Add a program at guest path `dest` plus, if it is dynamic, the libraries and
 * the loader ldd names, each at the path ldd gives. */
static int add_program(struct archive *a, const char *src, const char *dest, uint64_t *total,
		       unsigned *nlibs)
{
	__do_free char *out = NULL;
	char *save = NULL;
	uint64_t sz;
	int dyn, st;

	dyn = elf_is_dynamic(src);
	if (dyn < 0 || archive_add_file(a, dest, 0755, src, &sz) < 0)
		return -1;
	*total = sz;
	*nlibs = 0;
	if (!dyn)
		return 0;
	st = run_capture((char *const[]){"ldd", (char *)src, NULL}, &out, NULL);
	if (st != 0) {
		error("ldd %s failed (status %d)", src, st);
		return -1;
	}
	for (char *line = strtok_r(out, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
		char *lib = strstr(line, "=> "), *end;
		if (lib)
			lib += 3;
		else
			lib = line + strspn(line, " \t");
		if (strncmp(lib, "not found", 9) == 0) {
			error("%s: shared library %s", src, line + strspn(line, " \t"));
			return -1;
		}
		if (*lib != '/')
			continue; /* linux-vdso.so.1 and the like */
		end = strstr(lib, " (");
		if (end)
			*end = '\0';
		if (archive_add_file(a, lib + 1, 0755, lib, &sz) < 0)
			return -1;
		if (verbose)
			printf("  library %s\n", lib);
		*total += sz;
		(*nlibs)++;
	}
	return 0;
}

/* clang-format off */
/* /init.  capsafs.run on the kernel command line is percent-decoded (%20 for
 * a space) and may also be written in double quotes: capsafs.run="a b". */
static const char init_script[] =
	"#!/bin/sh\n"
	"# /init of a capsafs guest, written by capsafs-mkinitrd.\n"
	"export PATH=/bin:/usr/bin HOME=/root PS1='# '\n"
	"mount -t proc proc /proc\n"
	"mount -t sysfs sysfs /sys\n"
	"mount -t devtmpfs devtmpfs /dev\n"
	"mkdir -p /dev/pts && mount -t devpts devpts /dev/pts\n"
	"\n"
	"n=0\n"
	"while read -r mod; do\n"
	"\tcase \"$mod\" in ''|'#'*) continue ;; esac\n"
	"\tif insmod \"$mod\"; then n=$((n + 1)); else echo \"capsafs-guest: insmod $mod failed\"; fi\n"
	"done </etc/capsafs-modules\n"
	"ip link set lo up 2>/dev/null\n"
	"# ACPI power button (capsafs' stop): power off at once, even before init runs.\n"
	"for d in /sys/class/input/event*; do\n"
	"\t[ \"$(cat \"$d/device/name\" 2>/dev/null)\" = 'Power Button' ] || continue\n"
	"\tsetsid sh -c \"exec </dev/input/${d##*/}; : >/tmp/.power-armed; head -c 1 >/dev/null && poweroff -f\" \\\n"
	"\t\t>/dev/null 2>&1 &\n"
	"\t# say ready only once a press cannot be missed\n"
	"\ti=0; while [ ! -e /tmp/.power-armed ] && [ $i -lt 100 ]; do usleep 10000; i=$((i + 1)); done\n"
	"done\n"
	"echo \"capsafs-guest: $n modules loaded\"\n"
	"echo 'capsafs-guest: ready'\n"
	"\n"
	"cmdline=\" $(cat /proc/cmdline)\"\n"
	"run=$(printf '%s\\n' \"$cmdline\" | sed -n 's/.* capsafs\\.run=\"\\([^\"]*\\)\".*/\\1/p')\n"
	"[ -n \"$run\" ] || run=$(printf '%s\\n' \"$cmdline\" | sed -n 's/.* capsafs\\.run=\\([^\" ][^ ]*\\).*/\\1/p')\n"
	"if [ -n \"$run\" ]; then\n"
	"\trun=$(printf '%b' \"$(printf '%s' \"$run\" | sed 's/\\\\/\\\\\\\\/g; s/%/\\\\x/g')\")\n"
	"\techo \"capsafs-guest: run: $run\"\n"
	"\tsetsid sh -c 'sh -c \"$1\"; echo \"capsafs-guest: run exited with status $?\"' sh \"$run\" \\\n"
	"\t\t</dev/null >/dev/console 2>&1 &\n"
	"fi\n"
	"\n"
	"# busybox init respawns the console shell (/etc/inittab) and takes\n"
	"# poweroff, reboot and halt without -f.\n"
	"exec /bin/busybox init\n";

/* The shell is a login shell so that it reads /etc/profile.  cttyhack gives it
 * the real console device (ttyS0) as controlling tty: job control, Ctrl-C. */
static const char inittab[] = "::respawn:/bin/cttyhack /bin/sh -l\n";
static const char profile[] = "export HOME=/root PS1='# '\n"
			      "cd\n";
/* clang-format on */

/* ---- main --------------------------------------------------------------- */

static void usage(FILE *f)
{
	fprintf(f, "usage: " PROG " [-v] [-b MODROOT] [-k KVERSION] [-m MODULE]... [-o OUTPUT]\n"
		   "  -b MODROOT   root holding lib/modules/KVERSION (default /)\n"
		   "  -k KVERSION  kernel version (default: uname -r)\n"
		   "  -m MODULE    also include MODULE and its dependencies (repeatable)\n"
		   "  -o OUTPUT    output file (default initrd.img)\n"
		   "  -v           list more of what goes in; twice lists every entry\n");
}

static const char *env_or(const char *var, const char *dflt)
{
	const char *v = getenv(var);

	return v && *v ? v : dflt;
}

static int build(struct archive *a, const struct modules *mods, const char *kver,
		 const char *busybox, const char *socat)
{
	__do_free char *list = NULL, *dep = NULL, *depname = NULL;
	size_t llen = 0;
	FILE *f;
	uint64_t sz, modtotal = 0;
	unsigned n;
	char hb[32];

	if (archive_add_dir(a, "dev", 0755) < 0 ||
	    archive_add_node(a, "dev/console", S_IFCHR | 0600, 5, 1) < 0 ||
	    archive_add_node(a, "dev/null", S_IFCHR | 0666, 1, 3) < 0 ||
	    archive_add_dir(a, "proc", 0555) < 0 || archive_add_dir(a, "sys", 0555) < 0 ||
	    archive_add_dir(a, "tmp", 01777) < 0 || archive_add_dir(a, "root", 0700) < 0 ||
	    archive_add_dir(a, "usr/bin", 0755) < 0 || archive_add_symlink(a, "sbin", "bin") < 0 ||
	    archive_add_symlink(a, "usr/sbin", "../bin") < 0)
		return -1;

	if (add_busybox(a, busybox, &sz, &n) < 0)
		return -1;
	printf("  busybox  %s (%s, %u applets)\n", busybox, human(sz, hb), n);
	if (add_program(a, socat, "usr/bin/socat", &sz, &n) < 0)
		return -1;
	printf("  socat    %s (%s with %u libraries)\n", socat, human(sz, hb), n);

	f = open_memstream(&list, &llen);
	if (!f) {
		error("out of memory");
		return -1;
	}
	for (size_t i = 0; i < mods->norder; i++) {
		const struct module *mod = &mods->v[mods->order[i]];
		if (add_module(a, kver, mod, &sz) < 0) {
			fclose(f);
			return -1;
		}
		modtotal += sz;
		fprintf(f, "/lib/modules/%s/%s\n", kver, mod->rel);
		printf("  module   %-36s %9s  %s\n", mod->name, human(sz, hb), mod->rel);
	}
	if (fclose(f) != 0)
		return -1;
	printf("  modules  %zu, %s\n", mods->norder, human(modtotal, hb));

	dep = modules_guest_dep(mods);
	if (!dep || asprintf(&depname, "lib/modules/%s/modules.dep", kver) < 0) {
		error("out of memory");
		return -1;
	}
	if (archive_add_data(a, depname, 0644, dep, strlen(dep)) < 0 ||
	    archive_add_data(a, "etc/capsafs-modules", 0644, list, llen) < 0 ||
	    archive_add_data(a, "etc/passwd", 0644, "root:x:0:0:root:/root:/bin/sh\n", 30) < 0 ||
	    archive_add_data(a, "etc/group", 0644, "root:x:0:\n", 10) < 0 ||
	    archive_add_data(a, "etc/inittab", 0644, inittab, sizeof(inittab) - 1) < 0 ||
	    archive_add_data(a, "etc/profile", 0644, profile, sizeof(profile) - 1) < 0)
		return -1;
	return archive_add_data(a, "init", 0755, init_script, sizeof(init_script) - 1);
}

static int check_program(const char *what, const char *path, const char *package)
{
	struct stat st;

	if (stat(path, &st) < 0) {
		error("%s not found at %s (apt-get install %s)", what, path, package);
		return -1;
	}
	if (!S_ISREG(st.st_mode) || access(path, X_OK) < 0) {
		error("%s at %s is not an executable file", what, path);
		return -1;
	}
	return 0;
}

int main(int argc, char **argv)
{
	const char *modroot = "/", *kver = NULL, *output = "initrd.img";
	const char *busybox = env_or("CAPSAFS_BUSYBOX", BUSYBOX_PATH);
	const char *socat = env_or("CAPSAFS_SOCAT", SOCAT_PATH);
	static const char *const no_config[] = {NULL}; /* ignore the host's modprobe.d */
	__do_free const char **extra = NULL;
	__do_free char *moddir = NULL, *depfile = NULL, *abs = NULL, *tmp = NULL;
	__do_close int outfd = -1;
	struct modules mods = {0};
	struct archive a = {.fd = -1};
	struct utsname uts;
	struct stat st;
	size_t nextra = 0;
	char hb[32], hb2[32];
	bool ok = false;
	mode_t mask;
	int opt;

	setvbuf(stdout, NULL, _IOLBF, 0); /* progress interleaves with the tools' errors */
	extra = calloc((size_t)argc, sizeof(*extra));
	if (!extra)
		return 1;
	while ((opt = getopt(argc, argv, "vb:k:m:o:h")) != -1) {
		switch (opt) {
		case 'v':
			verbose++;
			break;
		case 'b':
			modroot = optarg;
			break;
		case 'k':
			kver = optarg;
			break;
		case 'm':
			extra[nextra++] = optarg;
			break;
		case 'o':
			output = optarg;
			break;
		case 'h':
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return 2;
		}
	}
	if (optind != argc) {
		error("unexpected argument %s", argv[optind]);
		usage(stderr);
		return 2;
	}
	if (!*modroot)
		modroot = "/";
	if (!kver) {
		if (uname(&uts) < 0) {
			error("uname: %m");
			return 1;
		}
		kver = uts.release;
	}
	if (!*kver || strchr(kver, '/')) {
		error("bad kernel version '%s'", kver);
		return 1;
	}
	if (asprintf(&moddir, "%s%slib/modules/%s", modroot,
		     modroot[strlen(modroot) - 1] == '/' ? "" : "/", kver) < 0 ||
	    asprintf(&depfile, "%s/modules.dep.bin", moddir) < 0)
		return 1;
	if (stat(moddir, &st) < 0 || !S_ISDIR(st.st_mode)) {
		error("no module tree for kernel %s: %s does not exist (see -b and -k)", kver,
		      moddir);
		return 1;
	}
	/* libkmod makes the paths it returns absolute; so must we, to strip the prefix. */
	abs = realpath(moddir, NULL);
	if (!abs) {
		error("%s: %m", moddir);
		return 1;
	}
	free(moddir);
	moddir = move_ptr(abs);
	if (access(depfile, R_OK) < 0) { /* libkmod reads the index depmod makes with modules.dep */
		error("%s is missing: run depmod -b %s %s", depfile, modroot, kver);
		return 1;
	}
	if (check_program("busybox", busybox, "busybox-static") < 0 ||
	    check_program("socat", socat, "socat") < 0)
		return 1;

	mods.dir = moddir;
	mods.ctx = kmod_new(moddir, no_config);
	if (!mods.ctx) {
		error("libkmod cannot use %s", moddir);
		return 1;
	}
	kmod_load_resources(mods.ctx); /* only a speed-up: lookups fall back to the files */
	for (size_t i = 0; i < ARRAY_SIZE(default_modules); i++)
		if (modules_add(&mods, default_modules[i]) < 0)
			goto out;
	for (size_t i = 0; i < nextra; i++)
		if (modules_add(&mods, extra[i]) < 0)
			goto out;

	printf(PROG ": kernel %s, modules from %s\n", kver, moddir);
	for (size_t i = 0; i < mods.nbuiltin; i++)
		printf("  builtin  %s\n", mods.builtin[i]);

	/* Write next to the output and rename, so a failed run leaves no half image. */
	if (asprintf(&tmp, "%s.XXXXXX", output) < 0)
		goto out;
	outfd = mkostemp(tmp, O_CLOEXEC);
	if (outfd < 0) {
		error("cannot create %s: %m", output);
		free(move_ptr(tmp));
		goto out;
	}
	mask = umask(0);
	umask(mask);
	fchmod(outfd, 0644 & ~mask); /* mkostemp made it 0600 */
	signal(SIGPIPE, SIG_IGN);    /* a dead gzip shows up as EPIPE and its exit status */
	if (archive_open(&a, outfd) < 0)
		goto out;
	ok = build(&a, &mods, kver, busybox, socat) == 0;
	if (archive_close(&a, ok) < 0) {
		ok = false;
		goto out;
	}
	if (fstat(outfd, &st) < 0 || fsync(outfd) < 0 || rename(tmp, output) < 0) {
		error("cannot write %s: %m", output);
		ok = false;
		goto out;
	}
	free(move_ptr(tmp));
	printf(PROG ": wrote %s: %s (%s uncompressed, %u entries)\n", output,
	       human((uint64_t)st.st_size, hb), human(a.bytes, hb2), a.entries);
out:
	if (tmp)
		unlink(tmp);
	modules_free(&mods);
	return ok ? 0 : 1;
}
