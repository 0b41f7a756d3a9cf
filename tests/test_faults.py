"""Faults: QEMU killed in the middle of transfers, guests that never boot or reset
themselves, unmounting with busy files and running VMs.  The daemon must survive each and
say what happened in state, console and error."""

import errno
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import util

pytestmark = pytest.mark.watchdog(300)


@pytest.fixture(scope="module")
def m(module_mount_factory, guest_options):
    return module_mount_factory(guest_options)


def test_guest_that_resets_itself_is_stopped_with_the_reason_in_error(m):
    vm = m.mkvm("tiny")
    assert vm.write("memory", "16") == 0  # too little for the kernel: it resets
    vm.start()
    assert vm.wait_state(("stopped", "crashed"), timeout=120) == "stopped"
    assert "reset" in vm.error()
    assert m.proc.poll() is None


def test_guest_that_never_boots_runs_and_its_console_says_why(m):
    vm = m.mkvm("noinit")
    assert vm.write("cmdline", "console=ttyS0 rdinit=/nonexistent") == 0
    vm.start()
    assert vm.state() == "running"
    with util.Console(vm.path("console"), os.O_RDONLY) as con:
        con.expect(r"Kernel panic", timeout=120)
    assert vm.ctl("kill") == 0
    assert vm.state() == "stopped"


def _booted(m, name):
    vm = m.mkvm(name)
    return vm, vm.boot()


def test_qemu_killed_while_the_host_writes_to_the_guest(m):
    vm, con = _booted(m, "h2g")
    try:
        # a guest reader that never reads: the host writer runs out of credit and blocks
        con.check("( socat -u VSOCK-LISTEN:2100 SYSTEM:'sleep 600' >/dev/null 2>&1 </dev/null & )")
        deadline = time.monotonic() + 30
        while True:
            try:
                fd = util.fs(os.open, vm.path("vsock", "2100"), os.O_WRONLY)
                break
            except OSError as e:
                assert e.errno == errno.ECONNREFUSED and time.monotonic() < deadline
                time.sleep(0.2)
        result = {}

        def writer():
            try:
                while True:
                    os.write(fd, b"w" * 65536)
            except OSError as e:
                result["errno"] = e.errno

        t = threading.Thread(target=writer, daemon=True)
        t.start()
        time.sleep(2)
        assert t.is_alive(), f"the writer should be blocked on credit, got {result}"
        os.kill(vm.pid(), signal.SIGKILL)
        t.join(20)
        assert not t.is_alive(), "a write blocked on credit survived the hypervisor's death"
        assert result["errno"] in (errno.ECONNRESET, errno.EPIPE), util.errname(result["errno"])
        os.close(fd)
        assert vm.wait_state("crashed", timeout=20) == "crashed"
        assert "signal 9" in vm.error()
        assert util.errno_of(os.open, vm.path("vsock", "2100"), os.O_RDWR) == errno.ENOTCONN
    finally:
        con.close()


def test_qemu_killed_while_the_guest_sends_to_a_socket_client(m):
    vm, con = _booted(m, "g2h")
    try:
        assert vm.write("vsock/ctl", "listen 1100") == 0
        path = os.path.join(m.sockdir, vm.name, "1100.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(path)
            con.check("( socat -u OPEN:/dev/zero VSOCK-CONNECT:2:1100 "
                      ">/dev/null 2>&1 </dev/null & )")
            got = 0
            while got < (1 << 20):  # the stream is flowing
                chunk = s.recv(1 << 16)
                assert chunk, "the stream ended before the kill"
                got += len(chunk)
            os.kill(vm.pid(), signal.SIGKILL)
            deadline = time.monotonic() + 30
            while True:  # drain: the socket must end, by EOF or reset, not hang
                try:
                    chunk = s.recv(1 << 16)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                assert time.monotonic() < deadline, "the client's socket outlived the VM"
        assert vm.wait_state("crashed", timeout=20) == "crashed"
        assert not os.path.exists(path), "the port's socket outlived the VM"
    finally:
        con.close()
    assert m.proc.poll() is None


def test_sigusr1_reports_the_heap_on_stderr_and_the_daemon_keeps_serving(mount_factory):
    """SIGUSR1 (whose default action would kill the daemon) prints one heap line per
    signal, what soak runs use to tell a leak from rings that fill up.  Each VM holds a
    1 MiB console ring from mkdir to rmdir: the report sees three come and go."""
    m = mount_factory([])
    before = m.heap()
    vms = [m.mkvm() for _ in range(3)]
    during = m.heap()
    assert during["in_use"] - before["in_use"] >= 3 << 20
    for vm in vms:
        util.fs(os.rmdir, vm.dir)
    after = m.heap()
    assert during["in_use"] - after["in_use"] >= 3 << 20
    assert m.proc.poll() is None
    assert m.mkvm().value("state") == "stopped"


def test_unmount_with_busy_files_and_a_running_vm_does_not_hang(mount_factory, guest_options):
    mnt = mount_factory(guest_options)
    vm = mnt.mkvm("busy")
    con = vm.boot()
    qemu = vm.pid()
    assert vm.write("vsock/ctl", "listen 1200") == 0
    # a blocked accept and an open console: the mount is busy
    blocked = subprocess.Popen(["cat", vm.path("vsock", "1200")], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    # and a process holding one file of each kind (directory, attribute, state with a
    # poll, ctl); it dies all at once after the lazy unmount, so the kernel may tear the
    # channel down before every release reaches the daemon, which must free the rest
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import os, select, sys, time\n"
         "d = sys.argv[1]\n"
         "fds = [os.open(d, os.O_RDONLY | os.O_DIRECTORY), os.open(d + '/memory', os.O_RDWR),\n"
         "       os.open(d + '/state', os.O_RDONLY), os.open(d + '/ctl', os.O_WRONLY)]\n"
         "os.read(fds[1], 64)\n"
         "p = select.poll(); p.register(fds[2], select.POLLPRI); p.poll(0)\n"
         "print('held', flush=True)\n"
         "time.sleep(600)\n", vm.dir],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        time.sleep(0.5)
        r = subprocess.run(["fusermount3", "-u", mnt.mnt], capture_output=True, text=True,
                           timeout=30)
        assert r.returncode != 0 and "busy" in r.stderr.lower(), r
        assert vm.state() == "running"
        # a lazy unmount detaches it; once the last file closes the daemon stops the VM
        r = subprocess.run(["fusermount3", "-uz", mnt.mnt], capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 0, r.stderr
    finally:
        holder.kill()
        holder.wait(10)
        blocked.kill()
        blocked.wait(10)
        con.close()
    mnt.proc.wait(30)
    assert mnt.proc.returncode == 0
    util.wait_for(lambda: not util.pid_alive(qemu), 10, "QEMU to go with the daemon")
