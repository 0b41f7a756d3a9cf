"""Helpers for the capsafs tests (the libfuse/sshfs pattern).

Everything that touches the mount goes through a bounded wait: a FUSE request the daemon never
answers blocks the caller in the kernel, so file operations run in a helper thread that the test
stops waiting for (call_with_timeout), and the per-test watchdog in conftest.py kills the daemons
when a test overruns, which fails every request still in flight with ENOTCONN.
"""

import codecs
import errno
import hashlib
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid

FUSERMOUNT = shutil.which("fusermount3") or "fusermount3"
OP_TIMEOUT = 20  # one file operation on the mount (stop/restart pass their own)
MOUNT_TIMEOUT = 15  # daemon start to mounted
UMOUNT_TIMEOUT = 20  # fusermount3 -u to daemon exit (running VMs get 5 s of SIGTERM)
BOOT_TIMEOUT = 150  # start to 'capsafs-guest: ready' under TCG on a busy host
READY = "capsafs-guest: ready"

# Daemons that are alive, so the watchdog can kill them all when a test overruns.
LIVE_DAEMONS = set()
_live_lock = threading.Lock()


class Timeout(AssertionError):
    """A bounded wait ran out: the daemon or the guest did not do what it should."""


def call_with_timeout(fn, *args, timeout=OP_TIMEOUT, what=None, **kwargs):
    """Run fn(*args) in a helper thread, return its result or raise its exception; raise
    Timeout when it has not returned after `timeout` seconds (the thread is left blocked
    until the daemon answers or dies)."""
    box = {}

    def run():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # handed to the caller
            box["error"] = e

    t = threading.Thread(target=run, daemon=True, name=f"op {what or fn.__name__}")
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise Timeout(f"{what or getattr(fn, '__name__', fn)} did not return within {timeout} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def sha256_to_eof(read):
    """Call read() until it returns b"": the SHA-256 hex digest of what came, and its size."""
    h, n = hashlib.sha256(), 0
    while True:
        chunk = read()
        if not chunk:
            return h.hexdigest(), n
        h.update(chunk)
        n += len(chunk)


def wait_for(cond, timeout, what, interval=0.02):
    """Poll cond() until it returns something true; return that, or raise Timeout."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise Timeout(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
        interval = min(interval * 1.5, 0.2)


def errno_of(fn, *args, timeout=OP_TIMEOUT, **kwargs):
    """0 when fn(*args) succeeds, else the errno of the OSError it raised."""
    try:
        call_with_timeout(fn, *args, timeout=timeout, **kwargs)
        return 0
    except OSError as e:
        return e.errno


def errname(e):
    return errno.errorcode.get(e, str(e)) if e else "success"


# ---- files -------------------------------------------------------------------------------

def _as_bytes(v):
    return v if isinstance(v, bytes) else v.encode()


def _write_pieces(path, pieces, flags):
    fd = os.open(path, os.O_WRONLY | flags)
    err = None
    try:
        for p in pieces:
            n = os.write(fd, p)
            if n != len(p):
                raise AssertionError(f"short write to {path}: {n} of {len(p)} bytes")
    except OSError as e:
        err = e
    try:
        os.close(fd)
    except OSError as e:
        err = err or e
    if err:
        raise err


def write_attr(path, value, flags=0, pieces=None, timeout=OP_TIMEOUT):
    """Open path for writing and write `value` with one write(2) (or each of `pieces` with
    one write each, through the same open); return 0 or the errno that open/write/close
    failed with."""
    data = [_as_bytes(p) for p in pieces] if pieces is not None else [_as_bytes(value)]
    try:
        call_with_timeout(_write_pieces, path, data, flags, timeout=timeout,
                          what=f"write {data!r:.60} to {path}")
        return 0
    except OSError as e:
        return e.errno


def _read_all(path, flags, limit):
    fd = os.open(path, os.O_RDONLY | flags)
    try:
        out = b""
        while len(out) < limit:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            out += chunk
        return out
    finally:
        os.close(fd)


def read_bytes(path, flags=0, limit=16 << 20, timeout=OP_TIMEOUT):
    return call_with_timeout(_read_all, path, flags, limit, timeout=timeout, what=f"read {path}")


def read_attr(path, timeout=OP_TIMEOUT):
    """The whole text of a file (read to EOF)."""
    return read_bytes(path, timeout=timeout).decode(errors="replace")


def fs(fn, *args, timeout=OP_TIMEOUT):
    """Run one os.* call on the mount with a timeout (raises what it raises)."""
    return call_with_timeout(fn, *args, timeout=timeout, what=f"{fn.__name__}{args!r:.80}")


def pid_alive(pid):
    """True while pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def children_of(pid):
    """Pids whose parent is pid (QEMU processes of a daemon)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(d))
    return out


def proc_cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


# ---- mounts ------------------------------------------------------------------------------

def _unescape_mountinfo(s):
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def mount_entry(path):
    """The /proc/self/mountinfo fields of the mount at path, or None."""
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if _unescape_mountinfo(fields[4]) == path:
                return {"mountpoint": path, "fstype": fields[sep + 1], "source": fields[sep + 2],
                        "options": fields[5], "super_options": fields[sep + 3]}
    return None


def is_mounted(path):
    e = mount_entry(path)
    return e is not None and e["fstype"].startswith("fuse")


def default_sockdir(mnt):
    """Where capsafs puts a mount's sockets without -o sockdir= (see capsafs --help)."""
    if os.geteuid() == 0:
        base = "/run/capsafs"
    elif os.environ.get("XDG_RUNTIME_DIR"):
        base = os.path.join(os.environ["XDG_RUNTIME_DIR"], "capsafs")
    else:
        base = f"/tmp/capsafs-{os.geteuid()}"
    return os.path.join(base, os.path.realpath(mnt).lstrip("/").replace("/", "-") or "-")


# Lines of the daemon's stderr that no normal run should print.
_BAD_STDERR = re.compile(r"(?i)\b(warning|error|sanitizer|runtime error|leak|assert)")


def unexpected_stderr(text, allow=()):
    """The lines of a daemon's stderr that look like warnings or errors and that no pattern
    in `allow` excuses."""
    bad = []
    for line in text.splitlines():
        if _BAD_STDERR.search(line) and not any(re.search(a, line) for a in allow):
            bad.append(line)
    return bad


class Daemon:
    """One `capsafs -f` process, its stderr in a file, and the mount it makes."""

    def __init__(self, exe, mnt, workdir, options=(), args=()):
        self.exe = exe
        self.mnt = os.path.realpath(mnt)
        self.workdir = workdir
        self.options = list(options)
        self.args = list(args)
        self.proc = None
        self.stderr_path = os.path.join(workdir, f"capsafs-{uuid.uuid4().hex[:8]}.stderr")
        self.allow_stderr = []  # regexes of stderr lines a test expects
        self.qemu_pids = set()  # every QEMU pid seen, to check none outlives us
        self.returncode = None
        self.killed = False  # SIGKILLed by a test or the watchdog
        self.expect_exit_failure = False  # a test that wants the daemon to refuse to run

    @property
    def pid(self):
        return self.proc.pid

    HEAP_LINE = re.compile(r"capsafs: heap: (\d+) bytes in use(?:: (\d+) in arenas, (\d+) in "
                           r"(\d+) mmapped blocks; (\d+) bytes free kept)?")

    def heap(self, timeout=OP_TIMEOUT):
        """SIGUSR1 the daemon and return its heap report: bytes malloc has handed out
        (in_use), of them in its arenas and mmapped (None under ASan, whose allocator
        mallinfo2 does not see)."""
        before = len(self.HEAP_LINE.findall(self.stderr()))
        os.kill(self.pid, signal.SIGUSR1)
        lines = wait_for(lambda: self.HEAP_LINE.findall(self.stderr())[before:], timeout,
                         "the heap report on stderr")
        return dict(zip(("in_use", "arenas", "mmapped", "mmapped_blocks", "free"),
                        (int(x) if x else None for x in lines[0])))

    def command(self):
        cmd = [self.exe, "-f"] + self.args
        if self.options:
            cmd += ["-o", ",".join(self.options)]
        return cmd + [self.mnt]

    def start(self, wait=True):
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                         stdout=err, stderr=err, start_new_session=True)
        with _live_lock:
            LIVE_DAEMONS.add(self)
        if wait:
            self.wait_mounted()
        return self

    def stderr(self):
        try:
            with open(self.stderr_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def wait_mounted(self, timeout=MOUNT_TIMEOUT):
        def mounted():
            if self.proc.poll() is not None:
                raise AssertionError(f"capsafs exited with {self.proc.returncode} before "
                                     f"mounting {self.mnt}; stderr:\n{self.stderr()}")
            return is_mounted(self.mnt)
        wait_for(mounted, timeout, f"capsafs to mount {self.mnt}")
        e = mount_entry(self.mnt)
        assert e["fstype"] == "fuse.capsafs", e

    def note_qemu(self):
        """Remember the daemon's QEMU children (checked at unmount)."""
        if self.proc and self.proc.poll() is None:
            self.qemu_pids.update(children_of(self.proc.pid))

    def sigkill(self):
        self.killed = True
        self.note_qemu()
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def kill_vms(self):
        """Best-effort `kill` of every active VM (a cleanup step: errors are ignored)."""
        try:
            names = fs(os.listdir, self.mnt, timeout=5)
        except (OSError, Timeout):
            return
        for name in names:
            vm = VM(self.mnt, name)
            try:
                if vm.state(timeout=5) in ("starting", "running", "stopping"):
                    write_attr(vm.path("ctl"), "kill", timeout=15)
            except (OSError, Timeout, AssertionError):
                pass

    def unmount(self, timeout=UMOUNT_TIMEOUT):
        """fusermount3 -u and reap the daemon; SIGKILL and fusermount3 -uz as the last
        resort.  Never raises; returns a list of problems (empty when all went well)."""
        problems = []
        if self.proc is None:
            return problems
        self.note_qemu()
        wait = timeout
        if self.proc.poll() is None and is_mounted(self.mnt):
            try:
                r = subprocess.run([FUSERMOUNT, "-u", self.mnt], capture_output=True, text=True,
                                   timeout=timeout)
                if r.returncode != 0:
                    problems.append(f"fusermount3 -u {self.mnt} failed: {r.stderr.strip()}")
            except subprocess.TimeoutExpired:
                problems.append(f"fusermount3 -u {self.mnt} hung for {timeout} s")
            if problems:  # something holds the mount: detach it, give the daemon a moment
                subprocess.run([FUSERMOUNT, "-uz", self.mnt], capture_output=True, timeout=30)
                wait = 3
        try:
            self.returncode = self.proc.wait(wait)
        except subprocess.TimeoutExpired:
            problems.append(f"capsafs (pid {self.proc.pid}) did not exit within {wait} s "
                            "of the unmount; SIGKILLed")
            self.killed = True
            self.proc.kill()
            self.returncode = self.proc.wait(10)
        if is_mounted(self.mnt):
            subprocess.run([FUSERMOUNT, "-uz", self.mnt], capture_output=True, timeout=30)
        with _live_lock:
            LIVE_DAEMONS.discard(self)
        # QEMU dies with the daemon (PR_SET_PDEATHSIG); none may be left behind.
        left = [p for p in self.qemu_pids if pid_alive(p)]
        if left:
            try:
                wait_for(lambda: not any(pid_alive(p) for p in left), 5, "QEMU to exit")
            except Timeout:
                problems.append(f"QEMU processes {left} outlived capsafs; SIGKILLed")
                for p in left:
                    try:
                        os.kill(p, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        return problems

    def check_exit(self):
        """Problems with how the daemon ended: exit status and its stderr."""
        problems = []
        if self.expect_exit_failure:
            return problems
        if not self.killed and self.returncode not in (0, None):
            problems.append(f"capsafs exited with status {self.returncode}")
        bad = unexpected_stderr(self.stderr(), self.allow_stderr)
        if bad:
            problems.append("capsafs printed on stderr:\n  " + "\n  ".join(bad))
        return problems

    def cleanup(self):
        """Kill the VMs, unmount, reap; return every problem seen."""
        if self.proc is None:
            return []
        if self.proc.poll() is None:
            self.kill_vms()
        problems = self.unmount()
        return problems + self.check_exit()


def emergency_kill_all():
    """The watchdog's hammer: SIGKILL every live daemon (their QEMUs die with them), which
    fails every FUSE request still blocked with ENOTCONN."""
    with _live_lock:
        daemons = list(LIVE_DAEMONS)
    for d in daemons:
        try:
            d.note_qemu()
            d.killed = True
            if d.proc.poll() is None:
                os.kill(d.proc.pid, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    return daemons


# ---- VMs ---------------------------------------------------------------------------------

class VM:
    """A VM directory of a mount and its attribute files."""

    def __init__(self, root, name):
        self.root = root
        self.name = name
        self.dir = os.path.join(root, name)

    def __repr__(self):
        return f"VM({self.dir!r})"

    def path(self, *parts):
        return os.path.join(self.dir, *parts)

    def read(self, attr, timeout=OP_TIMEOUT):
        return read_attr(self.path(attr), timeout=timeout)

    def value(self, attr, timeout=OP_TIMEOUT):
        """An attribute's value: its text without the one trailing newline."""
        v = self.read(attr, timeout=timeout)
        return v[:-1] if v.endswith("\n") else v

    def write(self, attr, value, **kw):
        return write_attr(self.path(attr), value, **kw)

    def ctl(self, command, timeout=OP_TIMEOUT):
        return write_attr(self.path("ctl"), command, timeout=timeout)

    def state(self, timeout=OP_TIMEOUT):
        return self.value("state", timeout=timeout)

    def error(self):
        return self.read("error")

    def pid(self):
        v = self.value("pid")
        return int(v) if v else None

    def wait_state(self, want, timeout=30):
        """Wait until state is one of `want` (a string or a tuple); poll(2) on the state file
        wakes us early, a plain re-read every 0.2 s keeps this independent of poll working."""
        want = (want,) if isinstance(want, str) else tuple(want)
        deadline = time.monotonic() + timeout
        fd = fs(os.open, self.path("state"), os.O_RDONLY)
        try:
            while True:
                s = call_with_timeout(lambda: os.pread(fd, 4096, 0), what="read state")
                s = s.decode().strip()
                if s in want:
                    return s
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Timeout(f"{self.name}: state is {s!r}, not {want} after {timeout} s; "
                                  f"error: {self.error()!r}")
                p = select.poll()
                p.register(fd, select.POLLPRI | select.POLLIN)
                call_with_timeout(p.poll, int(min(left, 0.2) * 1000), what="poll state")
                time.sleep(0.02)  # POLLIN is always set: do not spin
        finally:
            os.close(fd)

    def start(self, timeout=60):
        e = self.ctl("start", timeout=timeout)
        assert e == 0, f"start {self.name}: {errname(e)}; error: {self.error()!r}"

    def boot(self, timeout=BOOT_TIMEOUT):
        """Start the VM, wait for the guest's init to say ready and its shell to answer;
        return an open Console positioned after the answer."""
        self.start()
        con = Console(self.path("console"))
        try:
            con.wait_ready(timeout)
        except BaseException:
            con.close()
            raise
        return con

    def kill(self):
        if self.state() in ("starting", "running", "stopping"):
            e = self.ctl("kill")
            assert e == 0, f"kill {self.name}: {errname(e)}"


# ---- the guest console -------------------------------------------------------------------

class Console:
    """An open console file: reads with O_NONBLOCK + poll(2), keeps all it read, finds
    patterns in it, types into it and runs shell commands between unique markers."""

    def __init__(self, path, flags=os.O_RDWR):
        self.path = path
        self.fd = fs(os.open, path, flags | os.O_NONBLOCK)
        self.data = ""  # everything read so far, \r\n kept
        self.pos = 0  # where the next expect() starts looking
        self._dec = codecs.getincrementaldecoder("utf-8")("replace")

    def close(self):
        if self.fd is not None:
            try:
                fs(os.close, self.fd, timeout=5)
            except (OSError, Timeout):
                pass
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def fill(self, timeout):
        """Wait up to `timeout` s for output; append it; return how many bytes came."""
        p = select.poll()
        p.register(self.fd, select.POLLIN)
        call_with_timeout(p.poll, int(timeout * 1000), timeout=timeout + OP_TIMEOUT,
                          what="poll console")
        got = 0
        while True:
            try:
                chunk = call_with_timeout(os.read, self.fd, 1 << 16, what="read console")
            except BlockingIOError:
                break
            if not chunk:
                break
            got += len(chunk)
            self.data += self._dec.decode(chunk)
        if not got:
            time.sleep(0.02)  # poll said readable but nothing came: do not spin
        return got

    def drain(self):
        """Read whatever is buffered now; move the expect() position to the end."""
        while self.fill(0):
            pass
        self.pos = len(self.data)

    def tail(self, n=1500):
        return self.data[-n:]

    def expect(self, pattern, timeout=30):
        """Wait for `pattern` (a regex) in the output after the last match; return the
        match and move past it."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.data, self.pos)
            if m:
                self.pos = m.end()
                return m
            left = deadline - time.monotonic()
            if left <= 0:
                raise Timeout(f"console {self.path}: no {rx.pattern!r} within {timeout} s; "
                              f"last output:\n{self.tail()}")
            self.fill(min(left, 1.0))

    def send(self, text):
        data = _as_bytes(text)
        while data:
            try:
                n = call_with_timeout(os.write, self.fd, data, what="write console")
                data = data[n:]
            except BlockingIOError:
                p = select.poll()
                p.register(self.fd, select.POLLOUT)
                call_with_timeout(p.poll, 1000, what="poll console for writing")

    def run(self, command, timeout=30):
        """Run one shell command line in the guest; return (exit status, output) with the
        output's \\r\\n made \\n.  The markers are echoed by the command, and their quotes
        keep the typed line (which the tty echoes) from matching."""
        tag = uuid.uuid4().hex[:12]
        self.send(f'echo "@@B""{tag}"; {command}; echo "@@E""{tag}" $?\n')
        m = self.expect(re.compile(rf"@@B{tag}\r?\n(.*?)@@E{tag} (\d+)", re.S), timeout=timeout)
        return int(m.group(2)), m.group(1).replace("\r\n", "\n").replace("\r", "")

    def check(self, command, timeout=30):
        """run() and assert the command succeeded; return its output."""
        status, out = self.run(command, timeout)
        assert status == 0, f"guest command {command!r} exited {status}: {out}"
        return out

    def wait_ready(self, timeout=BOOT_TIMEOUT, answer_first=False):
        """Wait for the init's ready line, then until the shell answers a command (input
        typed before the shell reads the tty can be lost, so retry).  answer_first: a guest
        that may have booted long ago (its ready line may have left the ring) counts as
        ready as soon as its shell answers."""
        if answer_first:
            try:
                self.run("true", timeout=5)
                return
            except Timeout:
                pass
        self.expect(re.escape(READY), timeout)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.run("true", timeout=4)
                return
            except Timeout:
                if time.monotonic() > deadline:
                    raise


# ---- the names the test plan uses -------------------------------------------------------

def wait_for_mount(daemon, timeout=MOUNT_TIMEOUT):
    daemon.wait_mounted(timeout)


def umount(daemon):
    """Unmount and reap (SIGKILL and a lazy unmount as the last resort); return problems."""
    return daemon.unmount()


def wait_for_state(vm, want, timeout=30):
    return vm.wait_state(want, timeout)


def wait_for_console(vm, pattern, timeout=30):
    """Read vm's console (backlog first) until `pattern` shows; return the match."""
    with Console(vm.path("console"), os.O_RDONLY) as con:
        return con.expect(pattern, timeout)


def run_in_guest(console, command, timeout=30):
    """(exit status, output) of one shell command line typed into the guest."""
    return console.run(command, timeout)


# ---- other users -------------------------------------------------------------------------

NOBODY = (65534, 65534)


def run_as(uid, gid, code, timeout=OP_TIMEOUT):
    """Run Python `code` as uid/gid (no supplementary groups); it may set `result` to a
    value that repr/eval round-trips.  Needs root.  OSError raised by the code becomes
    result = errno.  Returns the result."""
    prog = ("import os, sys\nresult = 0\ntry:\n"
            + "".join(f"    {line}\n" for line in code.splitlines())
            + "except OSError as e:\n    result = e.errno\nprint(repr(result))\n")
    r = subprocess.run([sys.executable, "-c", prog], user=uid, group=gid, extra_groups=[],
                       capture_output=True, text=True, timeout=timeout, cwd="/")
    assert r.returncode == 0, f"helper as uid {uid} failed: {r.stderr}"
    return eval(r.stdout.strip().splitlines()[-1])
