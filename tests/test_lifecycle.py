"""The life of a VM: start, the console, stop/kill/restart, power-off from inside, crashes,
state polling, and what happens to QEMU when the daemon goes away.

The tests share two guests (module-scoped) and are ordered so that few boots are needed;
each one still makes sure of its own starting point (Booted.ready() boots when needed)."""

import errno
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
import uuid

import pytest

import util
from conftest import Booted
from util import READY, Console, errname, errno_of, fs

STOP_TIMEOUT = 5  # the module mount's ACPI grace


@pytest.fixture(scope="module")
def lmount(module_mount_factory, guest_options):
    return module_mount_factory(guest_options + [f"stop_timeout={STOP_TIMEOUT}"])


@pytest.fixture(scope="module")
def a(lmount):
    b = Booted(lmount, "a", {"cmdline": "console=ttyS0 capsafs.who=vm-a"})
    yield b
    b.close()


@pytest.fixture(scope="module")
def b(lmount):
    b = Booted(lmount, "b", {"cmdline": "console=ttyS0 capsafs.who=vm-b", "cpus": "1",
                             "memory": "192"})
    yield b
    b.close()


def ensure_stopped(vm):
    if vm.state() in ("starting", "running", "stopping"):
        assert vm.ctl("kill") == 0
    assert vm.state() in ("stopped", "crashed")


def assert_one_line_error(vm):
    err = vm.error()
    assert err.strip() and err.endswith("\n") and err.count("\n") == 1, repr(err)
    return err


def is_qemu(pid):
    argv = util.proc_cmdline(pid)
    return bool(argv) and "qemu-system" in os.path.basename(argv[0])


# ---- start and the console ---------------------------------------------------------------

def test_start_returns_with_vm_running_under_qemu(a):
    vm = a.vm
    ensure_stopped(vm)
    assert vm.ctl("start\n") == 0
    assert vm.state() == "running"
    pid = vm.pid()
    assert pid and util.pid_alive(pid) and is_qemu(pid), (pid, util.proc_cmdline(pid))
    assert vm.read("error") == ""
    util.wait_for_console(vm, r"Linux version", timeout=60)  # the kernel talks
    a.ready()  # and the guest really boots: init says ready, the shell answers


def test_console_runs_commands_typed_into_it(a):
    con = a.ready()
    n = int(uuid.uuid4().int % 100000)
    assert con.check(f"echo hi-$(({n} + 1))") == f"hi-{n + 1}\n"
    assert con.check("seq 1 5") == "1\n2\n3\n4\n5\n"
    status, out = con.run("false")
    assert status == 1
    assert "capsafs.who=vm-a" in con.check("cat /proc/cmdline")


def test_new_console_reader_gets_everything_since_boot(a):
    con = a.ready()
    mark = "mark-" + uuid.uuid4().hex[:8]
    con.check(f"echo {mark}")
    with Console(a.vm.path("console"), os.O_RDONLY) as c2:
        c2.expect(r"Linux version", timeout=10)
        c2.expect(re.escape(READY), timeout=10)
        c2.expect(re.escape(mark), timeout=10)


def test_console_readers_all_see_new_output(a):
    con = a.ready()
    with Console(a.vm.path("console"), os.O_RDONLY) as c2:
        c2.expect(re.escape(READY), timeout=10)
        c2.drain()
        mark = "live-" + uuid.uuid4().hex[:8]
        con.check(f"echo {mark}")
        c2.expect(re.escape(mark), timeout=10)


def test_console_nonblocking_read_is_eagain_when_nothing_new_and_poll_wakes(a):
    con = a.ready()
    fd = fs(os.open, a.vm.path("console"), os.O_RDONLY | os.O_NONBLOCK)
    try:
        for _ in range(10000):  # the backlog is at most 1 MiB
            try:
                if not util.call_with_timeout(os.read, fd, 1 << 16):
                    pytest.fail("console read returned EOF on a running VM")
            except BlockingIOError:
                break
        else:
            pytest.fail("console never ran dry")
        p = select.poll()
        p.register(fd, select.POLLIN)
        assert util.call_with_timeout(p.poll, 0) == [], "POLLIN with nothing to read"
        mark = "woke-" + uuid.uuid4().hex[:8]
        box = {}
        t = threading.Thread(target=lambda: box.setdefault("ev", p.poll(15000)), daemon=True)
        t.start()
        con.send(f"echo {mark}\n")
        t.join(20)
        assert not t.is_alive() and box["ev"] and box["ev"][0][1] & select.POLLIN, box
        data = b""
        deadline = time.monotonic() + 10
        while mark.encode() not in data and time.monotonic() < deadline:
            try:
                data += util.call_with_timeout(os.read, fd, 1 << 16)
            except BlockingIOError:
                p.poll(200)
        assert mark.encode() in data
    finally:
        os.close(fd)
        con.drain()


def test_console_blocking_read_follows_output_and_ctrl_c_interrupts_it(a, tmp_path):
    con = a.ready()
    out = tmp_path / "cat.out"
    with open(out, "wb") as f:
        cat = subprocess.Popen(["cat", a.vm.path("console")], stdout=f, stderr=subprocess.STDOUT)
    try:
        util.wait_for(lambda: READY.encode() in out.read_bytes(), 15, "cat to replay the console")
        # like tail -f: no EOF, it waits for more
        with pytest.raises(subprocess.TimeoutExpired):
            cat.wait(1)
        mark = "tailf-" + uuid.uuid4().hex[:8]
        con.check(f"echo {mark}")
        util.wait_for(lambda: mark.encode() in out.read_bytes(), 10, "cat to see new output")
        cat.send_signal(signal.SIGINT)
        try:
            rc = cat.wait(5)
        except subprocess.TimeoutExpired:
            pytest.fail("SIGINT did not interrupt a blocked read of console (cat is stuck "
                        "in the FUSE request)")
        assert rc == -signal.SIGINT, rc
    finally:
        if cat.poll() is None:
            cat.kill()  # if it is stuck in the kernel, the teardown's SIGKILL frees it


def test_console_passes_ctrl_c_to_the_guest(a):
    con = a.ready()
    # printed by the job itself, so it is the tty's foreground job when the ^C comes
    con.send("""sh -c 'echo "sleep""-started"; exec sleep 1000'\n""")
    con.expect(r"sleep-started", timeout=10)
    con.send("\x03")  # the guest's tty turns it into SIGINT for the sleep
    assert con.check("echo after-ctrl-c", timeout=15) == "after-ctrl-c\n"


def test_rmdir_wakes_a_reader_blocked_on_the_console(lmount, tmp_path):
    """A `cat console` waiting on a VM that is removed must end, not hang forever."""
    vm = lmount.mkvm()
    cat = subprocess.Popen(["cat", vm.path("console")], stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            cat.wait(1)  # nothing printed yet: it blocks
        assert errno_of(os.rmdir, vm.dir) == 0
        try:
            cat.wait(5)
        except subprocess.TimeoutExpired:
            pytest.fail("cat of the console of a removed VM is still blocked")
    finally:
        if cat.poll() is None:
            cat.kill()


def test_many_blocked_console_readers_do_not_freeze_the_mount(lmount):
    """Blocked reads are parked, not worker threads: 40 of them leave the mount usable,
    and removing the VM ends them all."""
    vm = lmount.mkvm()
    cats = [subprocess.Popen(["cat", vm.path("console")], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL) for _ in range(40)]
    try:
        util.wait_for(lambda: all(_blocked_in_read(c.pid) for c in cats), 10,
                      "the readers to block")
        t0 = time.monotonic()
        other = lmount.mkvm()
        assert other.write("memory", "64") == 0 and other.value("memory") == "64"
        fs(os.rmdir, other.dir)
        assert time.monotonic() - t0 < 2, "the mount is starved by blocked console reads"
        assert errno_of(os.rmdir, vm.dir) == 0
        util.wait_for(lambda: all(c.poll() is not None for c in cats), 10,
                      "every blocked reader to end after rmdir")
    finally:
        for c in cats:
            if c.poll() is None:
                c.kill()


def _blocked_in_read(pid):
    """True once pid sleeps in the kernel (for cat on the console: in the FUSE read)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            st = f.read().rsplit(")", 1)[1].split()[0]
        with open(f"/proc/{pid}/syscall") as f:
            nr = f.read().split()[0]
    except OSError:
        return False
    return st in ("S", "D") and nr == "0"  # read(2) is syscall 0 on x86-64


def test_log_is_a_snapshot_that_ends_at_eof(a):
    con = a.ready()
    fd = fs(os.open, a.vm.path("log"), os.O_RDONLY)
    try:
        mark = "after-open-" + uuid.uuid4().hex[:8]
        con.check(f"echo {mark}")
        text = b""
        while True:
            chunk = util.call_with_timeout(os.read, fd, 1 << 16, timeout=10)
            if not chunk:
                break
            text += chunk
    finally:
        os.close(fd)
    assert READY.encode() in text and b"Linux version" in text
    assert mark.encode() not in text, "log grew after its open: not a snapshot"
    assert mark in util.read_attr(a.vm.path("log")), "a new open of log lacks recent output"


def test_console_keeps_the_last_mib_of_output(a):
    con = a.ready()
    mark = "ring-end-" + uuid.uuid4().hex[:8]
    # 17000 lines of 73 bytes (+\r\n) ≈ 1.27 MB, past the 1 MiB ring
    con.check("yes " + "x" * 72 + " | head -n 17000 > /dev/console; echo " + mark, timeout=120)
    log = util.read_bytes(a.vm.path("log"))
    assert mark.encode() in log
    assert READY.encode() not in log, "the start of the boot should have left the ring"
    assert 1000000 < len(log) <= (1 << 20) + 4096, len(log)
    with Console(a.vm.path("console"), os.O_RDONLY) as c2:
        c2.expect(re.escape(mark), timeout=15)
        assert READY not in c2.data
        assert len(c2.data.encode()) <= (1 << 20) + 4096
    con.drain()


# ---- two VMs, crashes --------------------------------------------------------------------

def test_two_vms_run_at_once_with_their_own_settings(a, b):
    cb = b.ready()
    ca = a.ready()
    assert "capsafs.who=vm-a" in ca.check("cat /proc/cmdline")
    assert "capsafs.who=vm-b" in cb.check("cat /proc/cmdline")
    assert a.vm.pid() != b.vm.pid()
    assert a.vm.value("cid") != b.vm.value("cid")
    kb = int(cb.check("sed -n 's/^MemTotal: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo"))
    assert kb <= 192 * 1024


def test_qemu_killed_from_outside_crashes_only_that_vm(a, b):
    b.ready()
    ca = a.ready()
    pid = b.vm.pid()
    os.kill(pid, signal.SIGKILL)
    b.vm.wait_state("crashed", timeout=15)
    err = assert_one_line_error(b.vm)
    assert re.search(r"(?i)signal|kill", err), err
    assert b.vm.read("pid") == ""
    assert a.vm.state() == "running"
    assert ca.check("echo still-alive") == "still-alive\n"


def test_crashed_vm_can_be_started_again_and_start_clears_error(b):
    if b.vm.state() != "crashed":
        b.ready()
        os.kill(b.vm.pid(), signal.SIGKILL)
        b.vm.wait_state("crashed", timeout=15)
    assert b.vm.read("error").strip()
    assert b.vm.ctl("start") == 0
    assert b.vm.state() == "running"
    assert b.vm.read("error") == ""
    assert b.vm.ctl("kill") == 0


def test_crashed_vm_can_be_removed(lmount, tmp_path):
    vm = lmount.mkvm()
    kernel = tmp_path / "not-a-kernel"
    kernel.write_text("this is not a kernel\n")
    assert vm.write("kernel", str(kernel)) == 0
    assert vm.ctl("start") == errno.EIO
    assert vm.state() == "crashed"
    assert errno_of(os.rmdir, vm.dir) == 0


# ---- restart, stop, power-off, kill, poll ------------------------------------------------

def test_restart_of_running_vm_boots_it_afresh(a):
    con = a.ready()
    mark = "old-boot-" + uuid.uuid4().hex[:8]
    con.check(f"echo {mark}")
    old = a.vm.pid()
    e = a.vm.ctl("restart", timeout=STOP_TIMEOUT + 60)
    assert e == 0, f"{errname(e)}: {a.vm.read('error')!r}"
    assert a.vm.state() == "running"
    new = a.vm.pid()
    assert new and new != old and not util.pid_alive(old)
    con.close()
    a.console = Console(a.vm.path("console"))
    a.console.wait_ready()
    assert mark not in a.console.data, "console shows output of the previous boot"
    assert mark not in util.read_attr(a.vm.path("log"))


def test_stop_powers_the_guest_off_by_acpi_and_returns_once_stopped(a, elapsed):
    """The test guest handles the ACPI power button, so it is off well before the grace
    period: a stop that takes the whole stop_timeout means the request never reached it."""
    a.ready()
    pid = a.vm.pid()
    t0 = elapsed()
    e = a.vm.ctl("stop", timeout=STOP_TIMEOUT + 30)
    took = elapsed() - t0
    assert e == 0, errname(e)
    assert a.vm.state() == "stopped"
    assert a.vm.read("pid") == ""
    assert a.vm.read("error") == ""
    assert not util.pid_alive(pid)
    assert took < STOP_TIMEOUT - 1, f"stop took {took:.1f} s: the guest was killed, not powered off"


def test_stop_of_guest_ignoring_acpi_is_stopping_busy_then_killed_after_grace(lmount):
    """A guest booted with acpi=off cannot hear the power button: `stop` spends exactly
    the grace period (stop_timeout) in `stopping`, refusing changes, then kills it."""
    vm = lmount.mkvm()
    assert vm.write("cmdline", "console=ttyS0 acpi=off") == 0
    vm.start()
    pid = vm.pid()
    box = {}

    def stop():
        t0 = time.monotonic()
        box["e"] = vm.ctl("stop", timeout=STOP_TIMEOUT + 30)
        box["took"] = time.monotonic() - t0

    t = threading.Thread(target=stop, daemon=True)
    t.start()
    try:
        vm.wait_state("stopping", timeout=10)
        # the rest of the mount does not wait for this VM's stop
        t1 = time.monotonic()
        other = lmount.mkvm()
        assert other.write("cpus", "2") == 0 and other.state() == "stopped"
        assert vm.name in fs(os.listdir, lmount.mnt)
        fs(os.rmdir, other.dir)
        assert time.monotonic() - t1 < 1.5, "the mount froze while a VM was stopping"
        assert vm.write("cpus", "2") == errno.EBUSY
        assert errno_of(os.rmdir, vm.dir) == errno.EBUSY
        assert vm.pid() == pid
        t1 = time.monotonic()
        e = vm.ctl("start", timeout=STOP_TIMEOUT + 30)
        waited = time.monotonic() - t1
        assert e == errno.EBUSY and waited < 2, \
            f"start while stopping: {errname(e)} after {waited:.1f} s (state now {vm.state()})"
    finally:
        t.join(STOP_TIMEOUT + 35)
        if vm.state() == "running":
            vm.ctl("kill")
    assert not t.is_alive() and box["e"] == 0, box
    assert STOP_TIMEOUT - 1 <= box["took"] < STOP_TIMEOUT + 10, box
    assert vm.state() == "stopped" and not util.pid_alive(pid)
    assert vm.value("cpus") == "1"


def test_guest_poweroff_stops_vm_without_error(a):
    con = a.ready()
    pid = a.vm.pid()
    con.send("poweroff -f\n")
    a.vm.wait_state("stopped", timeout=30)
    assert a.vm.read("pid") == ""
    assert a.vm.read("error") == ""
    util.wait_for(lambda: not util.pid_alive(pid), 5, "QEMU to be gone")
    # the last boot's output stays readable for a post-mortem
    assert READY in util.read_attr(a.vm.path("log"))


def test_restart_of_stopped_vm_starts_it(a):
    ensure_stopped(a.vm)
    assert a.vm.ctl("restart") == 0
    assert a.vm.state() == "running"
    assert a.vm.pid()


def test_state_poll_reports_a_change_with_pollpri(a):
    vm = a.vm
    if vm.state() != "running":
        vm.start()
    fd = fs(os.open, vm.path("state"), os.O_RDONLY)
    try:
        assert util.call_with_timeout(os.pread, fd, 100, 0) == b"running\n"
        p = select.poll()
        p.register(fd, select.POLLPRI | select.POLLIN)
        ev = util.call_with_timeout(p.poll, 0)
        assert ev and ev[0][1] & select.POLLIN and not ev[0][1] & select.POLLPRI, ev
        box = {}
        p2 = select.poll()
        p2.register(fd, select.POLLPRI)
        t = threading.Thread(target=lambda: box.setdefault("ev", p2.poll(20000)), daemon=True)
        t.start()
        assert vm.ctl("kill") == 0
        t.join(10)
        assert not t.is_alive(), "poll() was not woken by the state change"
        assert box["ev"] and box["ev"][0][1] & select.POLLPRI, box
        assert box["ev"][0][1] & select.POLLERR, box
        # the new value, and reading from offset 0 re-arms
        assert util.call_with_timeout(os.pread, fd, 100, 0) == b"stopped\n"
        ev = util.call_with_timeout(p.poll, 0)
        assert not (ev and ev[0][1] & select.POLLPRI), ev
    finally:
        os.close(fd)


def test_state_poll_wakes_only_the_pollers_of_the_vm_that_changed(lmount, guest_options):
    x, y = lmount.mkvm(), lmount.mkvm()
    fds = {n: [fs(os.open, v.path("state"), os.O_RDONLY) for _ in range(2)]
           for n, v in (("x", x), ("y", y))}
    try:
        for fd in fds["x"] + fds["y"]:
            util.call_with_timeout(os.pread, fd, 100, 0)
        woke = {}

        def wait(name, i, fd):
            p = select.poll()
            p.register(fd, select.POLLPRI)
            woke[(name, i)] = p.poll(8000)

        threads = [threading.Thread(target=wait, args=(n, i, fd), daemon=True)
                   for n in fds for i, fd in enumerate(fds[n])]
        for t in threads:
            t.start()
        x.start()
        for t in threads:
            t.join(12)
        assert woke[("x", 0)] and woke[("x", 1)], woke
        assert woke[("y", 0)] == [] and woke[("y", 1)] == [], woke
        assert util.call_with_timeout(os.pread, fds["x"][0], 100, 0) == b"running\n"
    finally:
        for fd in fds["x"] + fds["y"]:
            os.close(fd)
        x.kill()


def test_kill_stops_at_once(a):
    vm = a.vm
    if vm.state() != "running":
        vm.start()
    pid = vm.pid()
    assert vm.ctl("kill") == 0
    assert vm.state() == "stopped"
    assert vm.read("pid") == ""
    assert not util.pid_alive(pid), "kill returned while QEMU still runs"


def test_stop_and_kill_of_stopped_vm_are_einval(a):
    ensure_stopped(a.vm)
    for cmd in ("stop", "kill"):
        e = a.vm.ctl(cmd)
        assert e == errno.EINVAL, (cmd, errname(e))
        assert_one_line_error(a.vm)
    assert a.vm.state() in ("stopped", "crashed")


@pytest.mark.parametrize("cmd", ["\n", "bogus", "START", "start now", "start start", "stop 5",
                                 "start\nstop", "restart x", "kill -9", "start\0"])
def test_ctl_rejects_unknown_commands_and_arguments(lmount, cmd):
    vm = lmount.mkvm()
    e = vm.ctl(cmd)
    assert e == errno.EINVAL, errname(e)
    assert_one_line_error(vm)
    assert vm.state() == "stopped" and vm.read("pid") == ""


def test_start_with_missing_kernel_is_enoent(lmount, tmp_path):
    vm = lmount.mkvm()
    k = tmp_path / "vmlinuz"
    k.write_bytes(b"x")
    assert vm.write("kernel", str(k)) == 0
    k.unlink()
    e = vm.ctl("start")
    assert e == errno.ENOENT, errname(e)
    assert_one_line_error(vm)
    assert vm.state() in ("stopped", "crashed") and vm.read("pid") == ""


def test_start_of_a_non_kernel_fails_eio_and_crashes_with_qemus_message(lmount, tmp_path):
    vm = lmount.mkvm()
    k = tmp_path / "not-a-kernel"
    k.write_text("this is not a kernel\n")
    assert vm.write("kernel", str(k)) == 0
    e = vm.ctl("start")
    assert e == errno.EIO, errname(e)
    assert vm.state() == "crashed"
    err = vm.read("error")
    assert re.search(r"(?i)kernel", err), err  # QEMU: "invalid kernel header"
    assert vm.read("pid") == ""


def test_write_to_console_of_stopped_vm_is_enotconn(lmount):
    vm = lmount.mkvm()
    assert util.write_attr(vm.path("console"), "echo hi\n") == errno.ENOTCONN


def test_qemu_option_names_the_binary_and_auto_accel_picks_tcg_without_vmx(
        mount_factory, guest_options, tmp_path):
    """-o qemu=PATH is what runs; on a CPU without vmx/svm, accel=auto must choose tcg."""
    real = shutil.which("qemu-system-x86_64")
    args_file = tmp_path / "qemu.args"
    wrapper = tmp_path / "my-qemu"
    wrapper.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {args_file}\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    m = mount_factory(guest_options + [f"qemu={wrapper}", "accel=auto"])
    vm = m.mkvm()
    vm.start()
    args = args_file.read_text().splitlines()
    assert is_qemu(vm.pid())
    with open("/proc/cpuinfo") as f:
        has_vt = re.search(r"^flags\s*:.*\b(vmx|svm)\b", f.read(), re.M)
    if not has_vt:
        joined = " ".join(args)
        assert re.search(r"accel[= ]tcg", joined) and "kvm" not in joined, args
    assert vm.ctl("kill") == 0


# ---- the daemon's own life ---------------------------------------------------------------

def test_missing_qemu_makes_start_fail_enoent_with_sentence(mount_factory, guest_options):
    m = mount_factory(guest_options + ["qemu=/nonexistent/qemu-system-x86_64"])
    vm = m.mkvm()
    e = vm.ctl("start")
    assert e == errno.ENOENT, errname(e)
    assert_one_line_error(vm)
    assert vm.state() in ("stopped", "crashed") and vm.read("pid") == ""


BAD_ARGS = {
    "accel": ["-o", "accel=bogus"],
    "vsock": ["-o", "vsock=bogus"],
    "unknown-option": ["-o", "no_such_option=1"],
    "relative-kernel": ["-o", "kernel=vmlinuz"],
    "stop_timeout": ["-o", "stop_timeout=soon"],
}
if not os.path.exists("/dev/vhost-vsock"):
    BAD_ARGS["vsock-kernel-without-vhost"] = ["-o", "vsock=kernel"]


@pytest.mark.parametrize("args", list(BAD_ARGS.values()), ids=list(BAD_ARGS))
def test_bad_option_exits_nonzero_with_one_line(mount_factory, args):
    m = mount_factory(args=args, wait=False, sockdir=False)
    m.expect_exit_failure = True
    try:
        rc = m.proc.wait(15)
    except subprocess.TimeoutExpired:
        pytest.fail(f"capsafs {' '.join(args)} kept running")
    assert rc != 0
    lines = [ln for ln in m.stderr().splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert not util.is_mounted(m.mnt)


def test_nonexistent_mountpoint_exits_nonzero_with_one_line(capsafs_exe, tmp_path):
    r = subprocess.run([capsafs_exe, "-f", str(tmp_path / "nowhere")], capture_output=True,
                       text=True, timeout=15)
    assert r.returncode != 0
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1, lines


def test_unmount_stops_running_vms_and_daemon_exits(mount_factory, guest_options, elapsed):
    m = mount_factory(guest_options)
    vms = [m.mkvm("u1"), m.mkvm("u2")]
    for vm in vms:
        vm.start()
    pids = [vm.pid() for vm in vms]
    assert all(pids)
    t0 = elapsed()
    r = subprocess.run([util.FUSERMOUNT, "-u", m.mnt], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    rc = m.proc.wait(20)
    assert rc == 0, m.stderr()
    assert elapsed() - t0 < 12
    for p in pids:
        assert not util.pid_alive(p), f"QEMU {p} outlived the unmount"
    assert not util.is_mounted(m.mnt)


def test_sigterm_to_daemon_unmounts_and_stops_vms(mount_factory, guest_options):
    m = mount_factory(guest_options)
    vm = m.mkvm()
    vm.start()
    pid = vm.pid()
    m.proc.send_signal(signal.SIGTERM)
    rc = m.proc.wait(20)
    assert rc == 0, m.stderr()
    assert not util.is_mounted(m.mnt)
    util.wait_for(lambda: not util.pid_alive(pid), 5, "QEMU to exit")


def test_daemon_sigkill_takes_qemu_with_it(mount_factory, guest_options):
    m = mount_factory(guest_options)
    vm = m.mkvm()
    vm.start()
    pid = vm.pid()
    assert util.pid_alive(pid)
    m.sigkill()
    util.wait_for(lambda: not util.pid_alive(pid), 3, f"QEMU {pid} to die with the daemon")


def test_failed_start_up_leaves_no_socket_directory(mount_factory):
    m = mount_factory(args=["-o", "no_such_option=1"], wait=False, sockdir=False)
    m.expect_exit_failure = True
    assert m.proc.wait(15) != 0
    d = util.default_sockdir(m.mnt)
    assert not os.path.exists(d), f"capsafs exited at start-up but left {d}"


def test_default_sockdir_is_private_and_goes_at_unmount(mount_factory):
    m = mount_factory(sockdir=False)
    vm = m.mkvm("sd")
    assert util.write_attr(vm.path("vsock", "ctl"), "listen 1024") == 0
    path = vm.read("vsock/ports").split()[2]
    sockdir = os.path.dirname(os.path.dirname(path))
    assert path == os.path.join(sockdir, "sd", "1024.sock")
    st = os.stat(sockdir)
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid(), oct(st.st_mode)
    assert m.unmount() == [] and m.returncode == 0
    left = [os.path.join(r, f) for r, _, fs_ in os.walk(sockdir) for f in fs_]
    assert not left, f"files left in the socket directory after unmount: {left}"
    assert not os.path.exists(sockdir), f"{sockdir} left behind after unmount"


def test_vm_with_longest_name_on_a_deep_mount_point_starts(mount_factory, guest_options):
    """Names may be 64 characters and mount points deep: sockets must still fit (sun_path
    holds 108 bytes), with the default socket directory."""
    m = mount_factory(guest_options, sockdir=False)
    vm = m.mkvm("n" * 64)
    e = vm.ctl("start")
    assert e == 0, f"{errname(e)}: {vm.read('error')!r}"
    assert vm.state() == "running"
    assert vm.ctl("kill") == 0


def test_stale_sockets_of_a_killed_daemon_are_replaced(mount_factory, guest_options, tmp_path):
    """A daemon SIGKILLed leaves its socket files; the next one on the same socket
    directory must replace them, not fail with EADDRINUSE."""
    sockdir = tempfile.mkdtemp(prefix="csfs-", dir="/tmp")
    try:
        m1 = mount_factory(guest_options + [f"sockdir={sockdir}"], sockdir=False)
        vm = m1.mkvm("same")
        assert util.write_attr(vm.path("vsock", "ctl"), "listen 1024") == 0
        vm.start()
        m1.sigkill()
        m2 = mount_factory(guest_options + [f"sockdir={sockdir}"], sockdir=False)
        vm = m2.mkvm("same")
        assert util.write_attr(vm.path("vsock", "ctl"), "listen 1024") == 0
        e = vm.ctl("start")
        assert e == 0, f"{errname(e)}: {vm.read('error')!r}"
        assert stat.S_ISSOCK(os.lstat(os.path.join(sockdir, "same", "1024.sock")).st_mode)
        assert vm.ctl("kill") == 0
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)

