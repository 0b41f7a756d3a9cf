"""Attribute files: defaults, round trips, every errno row, partial writes, error sentences,
and EBUSY for configuration changes while the VM runs."""

import errno
import os
import stat
import uuid

import pytest

import util
from conftest import Booted
from util import errname, fs

HOST_MIB = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // (1 << 20)
TAG = "capsafs.test=" + uuid.uuid4().hex[:10]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A few files to name in kernel/initrd: readable ones and a missing one."""
    d = tmp_path_factory.mktemp("files")
    k = d / "kernel.img"
    k.write_bytes(b"not really a kernel\n")
    i = d / "initrd.img"
    i.write_bytes(b"not really an initrd\n")
    return {"kernel": str(k), "initrd": str(i), "missing": str(d / "missing.img"), "dir": str(d)}


@pytest.fixture(scope="module")
def amount(module_mount_factory, files):
    """The module's mount, with known kernel/initrd defaults."""
    return module_mount_factory([f"kernel={files['kernel']}", f"initrd={files['initrd']}"])


@pytest.fixture
def vm(amount):
    """A fresh VM for one test (its error file starts empty)."""
    v = amount.mkvm()
    yield v
    v.kill()
    fs(os.rmdir, v.dir)


def assert_one_line_error(vm):
    err = vm.error()
    assert err.strip(), "error is empty after a failed write"
    assert err.endswith("\n") and err.count("\n") == 1, f"error is not one line: {err!r}"
    return err


# ---- defaults ----------------------------------------------------------------------------

def test_new_vm_shows_documented_defaults(vm, files):
    assert vm.read("cmdline") == "console=ttyS0\n"
    assert vm.read("cpus") == "1\n"
    assert vm.read("memory") == "512\n"
    assert vm.read("state") == "stopped\n"
    assert vm.read("kernel") == files["kernel"] + "\n"
    assert vm.read("initrd") == files["initrd"] + "\n"
    assert vm.read("pid") == ""
    assert vm.read("error") == ""
    assert int(vm.value("cid")) >= 3


def test_kernel_and_initrd_show_mount_defaults_until_written(amount, files, tmp_path):
    a, b = amount.mkvm(), amount.mkvm()
    other = tmp_path / "other.img"
    other.write_bytes(b"x")
    assert a.write("kernel", str(other)) == 0
    assert a.write("initrd", "\n") == 0
    assert a.value("kernel") == str(other) and a.read("initrd") == "\n"
    assert b.value("kernel") == files["kernel"] and b.value("initrd") == files["initrd"]
    c = amount.mkvm()
    assert c.value("kernel") == files["kernel"] and c.value("initrd") == files["initrd"]


def test_cid_default_is_lowest_free_from_3(mnt):
    a, b = mnt.mkvm("a"), mnt.mkvm("b")
    assert (a.value("cid"), b.value("cid")) == ("3", "4")
    assert a.write("cid", "10") == 0
    c = mnt.mkvm("c")
    assert c.value("cid") == "3"
    d = mnt.mkvm("d")
    assert d.value("cid") == "5"
    fs(os.rmdir, b.dir)
    assert mnt.mkvm("e").value("cid") == "4"
    assert a.write("cid", "3") == errno.EADDRINUSE
    assert a.write("cid", "4") == errno.EADDRINUSE
    assert a.write("cid", "6") == 0


def test_cid_used_by_another_vm_is_eaddrinuse(vm, amount):
    other = amount.mkvm()
    assert other.write("cid", "777") == 0
    e = vm.write("cid", "777")
    assert e == errno.EADDRINUSE, errname(e)
    assert vm.value("cid") != "777"
    assert_one_line_error(vm)
    # a VM's own cid is not "in use by another"
    assert other.write("cid", "777") == 0


# ---- round trips -------------------------------------------------------------------------

@pytest.mark.parametrize("attr,written,shown", [
    ("cpus", "4", "4"), ("cpus", "4\n", "4"), ("cpus", "1", "1"), ("cpus", "255\n", "255"),
    ("memory", "16", "16"), ("memory", "1024\n", "1024"), ("memory", str(HOST_MIB), str(HOST_MIB)),
    ("cid", "4294967294", "4294967294"), ("cid", "123456\n", "123456"),
    ("cmdline", "console=ttyS0 quiet", "console=ttyS0 quiet"),
    ("cmdline", "console=ttyS0 a=\"b c\"\n", "console=ttyS0 a=\"b c\""),
    ("cmdline", "x" * 4000, "x" * 4000),
    ("initrd", "\n", ""),
])
def test_value_round_trips_with_one_trailing_newline(vm, attr, written, shown):
    e = vm.write(attr, written)
    assert e == 0, f"{errname(e)}: {vm.error()!r}"
    assert vm.read(attr) == shown + "\n"
    assert vm.read("error") == ""


@pytest.mark.parametrize("attr", ["kernel", "initrd"])
def test_kernel_and_initrd_take_readable_absolute_paths(vm, files, attr):
    assert vm.write(attr, files["initrd"] + "\n") == 0
    assert vm.value(attr) == files["initrd"]
    assert vm.write(attr, files["kernel"]) == 0
    assert vm.value(attr) == files["kernel"]


def test_each_open_replaces_the_value(vm):
    assert vm.write("cpus", "4") == 0
    assert vm.write("cpus", "2") == 0
    assert vm.value("cpus") == "2"


def test_o_trunc_writes_work(vm):
    """`echo 3 > cpus` opens with O_CREAT|O_TRUNC."""
    assert vm.write("cpus", "3\n", flags=os.O_TRUNC | os.O_CREAT) == 0
    assert vm.value("cpus") == "3"


def test_value_written_in_pieces_through_one_open_is_joined(vm):
    assert vm.write("cpus", None, pieces=["1", "6\n"]) == 0
    assert vm.value("cpus") == "16"
    assert vm.write("cmdline", None, pieces=["console=ttyS0", " quiet", " loglevel=3\n"]) == 0
    assert vm.value("cmdline") == "console=ttyS0 quiet loglevel=3"


def test_values_read_back_byte_by_byte_and_at_offsets(vm):
    assert vm.write("cmdline", "console=ttyS0 abc") == 0
    fd = fs(os.open, vm.path("cmdline"), os.O_RDONLY)
    try:
        got = b""
        while True:
            c = util.call_with_timeout(os.read, fd, 1)
            if not c:
                break
            got += c
            assert len(got) < 100
        assert got == b"console=ttyS0 abc\n"
        assert util.call_with_timeout(os.pread, fd, 100, 8) == b"ttyS0 abc\n"
        assert util.call_with_timeout(os.pread, fd, 100, 18) == b""
    finally:
        os.close(fd)


# A zero-byte write(2) never reaches a FUSE daemon (the kernel answers it), so an empty
# value is written as a lone newline, as `echo > file` does.

# ---- errors ------------------------------------------------------------------------------

RANGE = (errno.ERANGE,)
RANGE_OR_INVAL = (errno.ERANGE, errno.EINVAL)  # the SPEC accepts EINVAL for out of range
INVAL = (errno.EINVAL,)

ERROR_ROWS = [
    # garbage and empty numbers
    ("cpus", "\n", INVAL), ("cpus", "abc", INVAL), ("cpus", "1x", INVAL),
    ("cpus", "x1", INVAL), ("cpus", "1.5", INVAL), ("cpus", " 2", INVAL), ("cpus", "2 ", INVAL),
    ("cpus", "2\n\n", INVAL), ("cpus", "1\n2", INVAL), ("cpus", "2\0", INVAL),
    ("memory", "\n", INVAL), ("memory", "512M", INVAL), ("memory", "lots", INVAL),
    ("cid", "\n", INVAL), ("cid", "three", INVAL), ("cid", "3\0", INVAL),
    # out of range
    ("cpus", "0", RANGE), ("cpus", "256", RANGE), ("cpus", "-1", RANGE_OR_INVAL),
    ("cpus", "99999999999999999999999", RANGE_OR_INVAL),
    ("memory", "15", RANGE), ("memory", "0", RANGE), ("memory", str(HOST_MIB + 1), RANGE),
    ("memory", "99999999999999999999999", RANGE_OR_INVAL),
    ("cid", "0", RANGE), ("cid", "1", RANGE), ("cid", "2", RANGE), ("cid", "4294967295", RANGE),
    ("cid", "4294967296", RANGE), ("cid", "-5", RANGE_OR_INVAL),
    # paths
    ("kernel", "\n", INVAL), ("kernel", "vmlinuz", INVAL),
    ("kernel", "./vmlinuz", INVAL), ("kernel", "/nonexistent/vmlinuz", (errno.ENOENT,)),
    ("kernel", "/tmp/a\nb", INVAL), ("kernel", "/tmp/a\0b", INVAL),
    ("kernel", "/" + "x" * 5000, INVAL),
    ("initrd", "initrd.img", INVAL), ("initrd", "/nonexistent/initrd.img", (errno.ENOENT,)),
    ("initrd", "/tmp/a\0b", INVAL),
    # text
    ("cmdline", "console=ttyS0\nquiet", INVAL), ("cmdline", "console=ttyS0\0quiet", INVAL),
    ("cmdline", "x" * 4097, INVAL), ("cmdline", "x" * 5000 + "\n", INVAL),
    ("cmdline", "quiet\n\n", INVAL),
    # bigger than one FUSE write request (128 KiB): arrives in pieces, still refused whole
    ("cmdline", "y" * (1 << 20), INVAL), ("cpus", "1" * (300 << 10), RANGE_OR_INVAL),
]


@pytest.mark.parametrize("attr,value,want", ERROR_ROWS,
                         ids=[f"{a}={v[:20]!r}" for a, v, _ in ERROR_ROWS])
def test_bad_value_fails_with_errno_and_one_line_error(vm, attr, value, want):
    before = vm.read(attr)
    e = vm.write(attr, value)
    assert e in want, f"{attr}={value[:40]!r}: got {errname(e)}, want {[errname(w) for w in want]}"
    assert vm.read(attr) == before, "a failed write changed the value"
    assert_one_line_error(vm)


def test_error_keeps_the_last_failure(vm):
    assert vm.write("cpus", "0") != 0
    first = assert_one_line_error(vm)
    assert vm.write("kernel", "relative") != 0
    second = assert_one_line_error(vm)
    assert first != second
    # a good write does not hide the last error (it is cleared by a successful start)
    assert vm.write("cpus", "2") == 0
    assert vm.read("error") in ("", second)


def test_error_sentence_is_per_vm(vm, amount):
    other = amount.mkvm()
    assert vm.write("cpus", "0") == errno.ERANGE
    assert other.read("error") == ""


def test_kernel_symlink_to_missing_file_is_enoent(vm, tmp_path):
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "nothing")
    assert vm.write("kernel", str(link)) == errno.ENOENT
    assert_one_line_error(vm)


def test_unreadable_kernel_is_eacces_for_the_calling_user(as_root, mount_factory, tmp_path,
                                                           files):
    """The daemon (root here) could read the file; the caller (nobody) cannot: EACCES."""
    m = mount_factory(["allow_other", f"kernel={files['kernel']}"])
    os.chmod(m.mnt, 0o1777)
    d = os.path.dirname(m.mnt)
    while d != "/":  # let nobody reach the mount point
        st = os.stat(d)
        os.chmod(d, stat.S_IMODE(st.st_mode) | 0o001)
        d = os.path.dirname(d)
    secret_dir = tmp_path / "secret"
    secret_dir.mkdir(mode=0o755)
    secret = secret_dir / "vmlinuz"
    secret.write_bytes(b"root only")
    secret.chmod(0o600)
    hidden = tmp_path / "hidden"
    hidden.mkdir(mode=0o700)
    (hidden / "vmlinuz").write_bytes(b"x")
    hidden_file = hidden / "vmlinuz"
    uid, gid = util.NOBODY
    vmdir = os.path.join(m.mnt, "theirs")
    assert util.run_as(uid, gid, f"os.mkdir({vmdir!r})") == 0
    for attr in ("kernel", "initrd"):
        for path in (str(secret), str(hidden_file)):
            e = util.run_as(uid, gid, f"fd = os.open({vmdir + '/' + attr!r}, os.O_WRONLY)\n"
                                      f"try:\n    os.write(fd, {path.encode()!r})\n"
                                      "finally:\n    os.close(fd)")
            assert e == errno.EACCES, (attr, path, errname(e))
            assert util.run_as(uid, gid, f"result = open({vmdir + '/error'!r}).read()").strip()
    # the same path is fine for root, who can read it
    mine = m.mkvm("mine")
    assert mine.write("kernel", str(secret)) == 0


def test_unreadable_kernel_is_eacces(vm, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads every file; see test_unreadable_kernel_is_eacces_for_the_calling_user")
    p = tmp_path / "vmlinuz"
    p.write_bytes(b"x")
    p.chmod(0)
    assert vm.write("kernel", str(p)) == errno.EACCES
    assert_one_line_error(vm)


# ---- while running -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def running(module_mount_factory, guest_options):
    """A guest booted with non-default settings, to see them from inside and to try
    changing them while it runs."""
    b = Booted(module_mount_factory(guest_options), "configured",
               {"cpus": "2", "memory": "256", "cmdline": f"console=ttyS0 {TAG}"})
    b.ready()
    yield b
    b.close()


def test_guest_sees_configured_cpus_memory_and_cmdline(running):
    con = running.ready()
    assert TAG in con.check("cat /proc/cmdline")
    assert con.check("grep -c ^processor /proc/cpuinfo").strip() == "2"
    kb = int(con.check("sed -n 's/^MemTotal: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo").strip())
    assert 128 * 1024 < kb <= 256 * 1024, kb


@pytest.mark.parametrize("attr", ["kernel", "initrd", "cmdline", "cpus", "memory", "cid"])
def test_config_change_while_running_is_ebusy(running, files, attr):
    running.ready()
    vm = running.vm
    value = {"kernel": files["kernel"], "initrd": files["initrd"], "cmdline": "console=ttyS0",
             "cpus": "1", "memory": "128", "cid": "4242"}[attr]
    before = vm.read(attr)
    e = vm.write(attr, value)
    assert e == errno.EBUSY, errname(e)
    assert vm.read(attr) == before
    assert_one_line_error(vm)
    assert vm.state() == "running"


def test_start_while_running_is_ebusy(running):
    running.ready()
    e = running.vm.ctl("start")
    assert e == errno.EBUSY, errname(e)
    assert_one_line_error(running.vm)
    assert running.vm.state() == "running"


def test_bad_value_while_running_is_still_refused(running):
    """Whichever of EBUSY/EINVAL wins, the write fails and nothing changes."""
    running.ready()
    before = running.vm.read("cpus")
    assert running.vm.write("cpus", "garbage") in (errno.EBUSY, errno.EINVAL)
    assert running.vm.read("cpus") == before


def test_kernel_swapped_for_unreadable_file_after_write_is_refused_at_start(
        as_root, mount_factory, tmp_path):
    """The check is made again at start with the writer's credentials: replacing the
    file by a symlink to a root-only file between write and start must not work."""
    m = mount_factory(["allow_other"])
    os.chmod(m.mnt, 0o1777)
    d = os.path.dirname(m.mnt)
    while d != "/":
        st = os.stat(d)
        os.chmod(d, stat.S_IMODE(st.st_mode) | 0o001)
        d = os.path.dirname(d)
    secret = tmp_path / "root-only.img"
    secret.write_bytes(b"root only\n")
    secret.chmod(0o600)
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o777)
    theirs.chmod(0o777)
    k = theirs / "vmlinuz"
    uid, gid = util.NOBODY
    vmdir = os.path.join(m.mnt, "swap")
    code = (f"open({str(k)!r}, 'w').write('x')\n"
            f"os.mkdir({vmdir!r})\n"
            f"fd = os.open({vmdir + '/kernel'!r}, os.O_WRONLY)\n"
            f"os.write(fd, {str(k).encode()!r})\nos.close(fd)\n"
            f"fd = os.open({vmdir + '/initrd'!r}, os.O_WRONLY)\n"
            "os.write(fd, b'\\n')\nos.close(fd)")
    assert util.run_as(uid, gid, code) == 0
    k.unlink()
    k.symlink_to(secret)
    e = util.run_as(uid, gid, f"fd = os.open({vmdir + '/ctl'!r}, os.O_WRONLY)\n"
                              "try:\n    os.write(fd, b'start')\nfinally:\n    os.close(fd)")
    assert e == errno.EACCES, errname(e)
    vm = m.vm("swap")
    assert vm.state() != "running" and vm.read("pid") == ""


@pytest.mark.parametrize("attr", ["kernel", "initrd"])
@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_kernel_that_is_not_a_regular_file_is_einval_at_once(vm, tmp_path, attr, kind):
    # a FIFO with no writer would block the daemon's open if it waited for one
    path = tmp_path / kind
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    assert vm.write(attr, str(path), timeout=5) == errno.EINVAL
    assert "not a regular file" in vm.error()
