"""vsock/ctl and vsock/ports: declaring, listing and closing ports, and the names that are
not ports.  No data goes through a port here (that is the vsock data path's own tests)."""

import errno
import os
import stat

import pytest

import util
from util import errname, errno_of, fs


@pytest.fixture(scope="module")
def vmount(module_mount_factory):
    return module_mount_factory()


@pytest.fixture
def vm(vmount):
    v = vmount.mkvm()
    yield v
    v.kill()
    fs(os.rmdir, v.dir)


def ports(vm):
    """vsock/ports as a set of (port, mode, socketpath, connections) tuples."""
    text = vm.read("vsock/ports")
    assert text == "" or text.endswith("\n"), repr(text)
    rows = set()
    for line in text.splitlines():
        f = line.split()
        assert len(f) == 4, line
        rows.add((int(f[0]), f[1], f[2], int(f[3])))
    return rows


def vctl(vm, command):
    return util.write_attr(vm.path("vsock", "ctl"), command)


def default_sock(vmount, vm, port):
    return os.path.join(vmount.sockdir, vm.name, f"{port}.sock")


def test_new_vm_has_no_declared_ports(vm):
    assert sorted(fs(os.listdir, vm.path("vsock"))) == ["ctl", "ports"]
    assert vm.read("vsock/ports") == ""


def test_listen_declares_port_with_default_socket(vm, vmount):
    assert vctl(vm, "listen 1024") == 0
    assert ports(vm) == {(1024, "listen", default_sock(vmount, vm, 1024), 0)}
    assert sorted(fs(os.listdir, vm.path("vsock"))) == ["1024", "ctl", "ports"]
    st = fs(os.stat, vm.path("vsock", "1024"))
    assert stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)  # owner-only
    assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())


def test_connect_declares_port_with_given_path(vm):
    assert vctl(vm, "connect 2000 /tmp/capsafs-test-2000.sock\n") == 0
    assert ports(vm) == {(2000, "connect", "/tmp/capsafs-test-2000.sock", 0)}


def test_many_ports_and_the_range_ends(vm, vmount):
    for cmd in ("listen 0", "connect 5", "listen 6 /tmp/six.sock", "connect 4294967294"):
        assert vctl(vm, cmd) == 0, cmd
    assert ports(vm) == {
        (0, "listen", default_sock(vmount, vm, 0), 0),
        (5, "connect", default_sock(vmount, vm, 5), 0),
        (6, "listen", "/tmp/six.sock", 0),
        (4294967294, "connect", default_sock(vmount, vm, 4294967294), 0),
    }
    assert set(fs(os.listdir, vm.path("vsock"))) == {"ctl", "ports", "0", "5", "6", "4294967294"}


def test_redeclaring_a_port_is_eexist(vm):
    assert vctl(vm, "listen 7") == 0
    for cmd in ("listen 7", "connect 7", "listen 7 /tmp/other.sock"):
        e = vctl(vm, cmd)
        assert e == errno.EEXIST, (cmd, errname(e))
    assert len(ports(vm)) == 1
    err = vm.read("error")
    assert err.strip() and err.count("\n") == 1, repr(err)


def test_close_removes_a_port_and_closing_again_is_enoent(vm):
    assert vctl(vm, "listen 7") == 0
    assert vctl(vm, "connect 8") == 0
    assert vctl(vm, "close 7") == 0
    assert {p[0] for p in ports(vm)} == {8}
    assert "7" not in fs(os.listdir, vm.path("vsock"))
    assert vctl(vm, "close 7") == errno.ENOENT
    assert vctl(vm, "close 9") == errno.ENOENT
    # a closed port can be declared again
    assert vctl(vm, "connect 7") == 0
    assert {p[:2] for p in ports(vm)} == {(7, "connect"), (8, "connect")}


RANGE = (errno.ERANGE,)
RANGE_OR_INVAL = (errno.ERANGE, errno.EINVAL)
INVAL = (errno.EINVAL,)
BAD = [
    ("\n", INVAL), ("listen", INVAL), ("listen\n", INVAL), ("listen abc", INVAL),
    ("listen 1x", INVAL), ("listen 1.0", INVAL), ("listen 1 relative.sock", INVAL),
    ("listen 1 /a.sock /b.sock", INVAL), ("bogus 1", INVAL), ("LISTEN 1", INVAL),
    ("connect", INVAL), ("close", INVAL), ("close 1 2", INVAL), ("close abc", INVAL),
    ("listen 1\n\n", INVAL), ("listen 1\0", INVAL), ("listen 1\nlisten 2", INVAL),
    ("listen 4294967295", RANGE), ("connect 4294967296", RANGE),
    ("listen 99999999999999999999999", RANGE_OR_INVAL), ("listen -1", RANGE_OR_INVAL),
    ("close 4294967295", RANGE_OR_INVAL),
]


@pytest.mark.parametrize("cmd,want", BAD, ids=[repr(c) for c, _ in BAD])
def test_bad_vsock_command_fails_with_errno_and_sentence(vm, cmd, want):
    e = vctl(vm, cmd)
    assert e in want, f"{cmd!r}: got {errname(e)}, want {[errname(w) for w in want]}"
    assert ports(vm) == set()
    err = vm.read("error")
    assert err.strip() and err.count("\n") == 1, repr(err)


@pytest.mark.parametrize("name", ["abc", "0042", "042", "-1", "+42", " 42", "42 ", "4294967295",
                                  "99999999999999999999", "1e3", "0x2a"])
def test_names_that_are_not_port_numbers_are_enoent(vm, name):
    assert vctl(vm, "listen 42") == 0
    e = errno_of(os.stat, vm.path("vsock", name))
    assert e == errno.ENOENT, errname(e)
    e = errno_of(os.open, vm.path("vsock", name), os.O_RDWR)
    assert e == errno.ENOENT, errname(e)


@pytest.mark.parametrize("declare", [None, "listen 42", "connect 42"])
def test_open_of_port_on_stopped_vm_is_enotconn(vm, declare):
    if declare:
        assert vctl(vm, declare) == 0
    for flags in (os.O_RDWR, os.O_RDWR | os.O_NONBLOCK):
        e = errno_of(os.open, vm.path("vsock", "42"), flags)
        assert e == errno.ENOTCONN, (declare, flags, errname(e))


def test_ports_belong_to_their_vm_and_go_with_rmdir(vmount):
    v1, v2 = vmount.mkvm("pv1"), vmount.mkvm("pv2")
    assert vctl(v1, "listen 1024") == 0
    assert ports(v2) == set()
    fs(os.rmdir, v1.dir)
    v1 = vmount.mkvm("pv1")
    assert ports(v1) == set()
    for v in (v1, v2):
        fs(os.rmdir, v.dir)


def test_declarations_may_be_made_while_running_and_outlive_the_run(booted):
    booted.ready()
    vm = booted.vm
    try:
        assert vctl(vm, "connect 2000") == 0
        assert vctl(vm, "listen 1024") == 0
        assert vctl(vm, "close 2000") == 0
        assert {p[:2] for p in ports(vm)} == {(1024, "listen")}
        assert vm.ctl("kill") == 0
        assert {p[:2] for p in ports(vm)} == {(1024, "listen")}
        vm.start()  # and they are there in the next run
        assert {p[:2] for p in ports(vm)} == {(1024, "listen")}
    finally:
        for p in ports(vm):
            vctl(vm, f"close {p[0]}")


def _sockets(d):
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, d)] = os.lstat(p)
    return out


def test_port_sockets_exist_while_running_and_go_at_stop(booted):
    """Exported sockets: SOCKDIR/<vm>/<port>.sock per declared port and the hybrid
    vsock.sock, owner-only, from start (or declaration) to stop; no data is sent here."""
    vm = booted.vm
    vm.kill()
    try:
        assert vctl(vm, "listen 1024") == 0
        vm.start()  # no need to wait for the guest: the sockets are the host's
        assert vctl(vm, "connect 2000") == 0  # declared while running: made at once
        d = os.path.join(booted.mount.sockdir, vm.name)
        socks = {n: st for n, st in _sockets(d).items() if stat.S_ISSOCK(st.st_mode)}
        for name in ("1024.sock", "2000.sock", "vsock.sock"):
            assert name in socks, f"{name} missing in {d}: {sorted(socks)}"
            assert not stat.S_IMODE(socks[name].st_mode) & 0o077, (name, oct(socks[name].st_mode))
        assert vm.ctl("kill") == 0
        left = [n for n, st in _sockets(d).items() if stat.S_ISSOCK(st.st_mode)] \
            if os.path.isdir(d) else []
        assert left == [], f"sockets left after stop: {left}"
    finally:
        for p in ports(vm):
            vctl(vm, f"close {p[0]}")
