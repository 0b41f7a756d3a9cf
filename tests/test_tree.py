"""The tree: what mkdir makes, modes, owners, names, and the operations the tree refuses."""

import errno
import os
import select
import stat
import threading

import pytest

import util
from util import errno_of, errname, fs

VM_FILES = {
    "kernel": 0o644, "initrd": 0o644, "cmdline": 0o644, "cpus": 0o644, "memory": 0o644,
    "cid": 0o644, "ctl": 0o200, "state": 0o444, "pid": 0o444, "console": 0o600,
    "log": 0o400, "error": 0o400,
}
VSOCK_FILES = {"ctl": 0o200, "ports": 0o444}


def test_root_is_empty_dir_owned_by_mounting_user_mode_0755(mnt):
    st = fs(os.stat, mnt.mnt)
    assert stat.S_ISDIR(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o755, oct(st.st_mode)
    assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())
    assert fs(os.listdir, mnt.mnt) == []


def test_mkdir_makes_vm_dir_with_every_attribute(mnt):
    vm = mnt.mkvm("alpha")
    assert fs(os.listdir, mnt.mnt) == ["alpha"]
    assert sorted(fs(os.listdir, vm.dir)) == sorted(list(VM_FILES) + ["vsock"])
    assert sorted(fs(os.listdir, vm.path("vsock"))) == sorted(VSOCK_FILES)


def test_vm_files_have_their_modes(mnt):
    vm = mnt.mkvm()
    got = {f: stat.S_IMODE(fs(os.stat, vm.path(f)).st_mode) for f in VM_FILES}
    assert {f: oct(m) for f, m in got.items()} == {f: oct(m) for f, m in VM_FILES.items()}
    for f in VM_FILES:
        assert stat.S_ISREG(fs(os.stat, vm.path(f)).st_mode), f
    got = {f: stat.S_IMODE(fs(os.stat, vm.path("vsock", f)).st_mode) for f in VSOCK_FILES}
    assert got == VSOCK_FILES
    for d in (vm.dir, vm.path("vsock")):
        st = fs(os.stat, d)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o755, (d, oct(st.st_mode))


def test_vm_tree_belongs_to_the_user_who_made_it(mnt):
    vm = mnt.mkvm()
    me = (os.getuid(), os.getgid())
    for p in [vm.dir, vm.path("vsock"), vm.path("vsock", "ctl"), vm.path("vsock", "ports")] + \
            [vm.path(f) for f in VM_FILES]:
        st = fs(os.stat, p)
        assert (st.st_uid, st.st_gid) == me, p


def test_readdir_lists_dot_entries_and_inode_numbers_match_stat(mnt):
    vm = mnt.mkvm("beta")
    with os.scandir(vm.dir) as it:
        entries = {e.name: e for e in it}
    for name, e in entries.items():
        assert e.inode() == fs(os.stat, e.path).st_ino, name
    fd = fs(os.open, vm.dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        names = set(os.listdir(fd))
    finally:
        os.close(fd)
    assert names == set(VM_FILES) | {"vsock"}


@pytest.mark.parametrize("name", ["a", "A", "0", "vm-1", "Vm_2.test", "x" * 64, "a..b", "a-", "a."])
def test_mkdir_accepts_valid_names(mnt, name):
    assert errno_of(os.mkdir, os.path.join(mnt.mnt, name)) == 0
    assert name in fs(os.listdir, mnt.mnt)
    assert fs(os.path.isfile, os.path.join(mnt.mnt, name, "state"))


@pytest.mark.parametrize("name", [".hidden", "-dash", "x" * 65, "a b", "a:b", "a*", "é",
                                  "tab\tname", "new\nline", "a+b", "a@b", "~a"])
def test_mkdir_rejects_bad_names_with_einval(mnt, name):
    e = errno_of(os.mkdir, os.path.join(mnt.mnt, name))
    assert e == errno.EINVAL, errname(e)
    assert fs(os.listdir, mnt.mnt) == []


def test_mkdir_of_existing_vm_is_eexist(mnt):
    mnt.mkvm("dup")
    assert errno_of(os.mkdir, os.path.join(mnt.mnt, "dup")) == errno.EEXIST
    assert fs(os.listdir, mnt.mnt) == ["dup"]


@pytest.mark.parametrize("where", ["vm", "vsock"])
def test_mkdir_inside_vm_or_vsock_is_eperm(mnt, where):
    vm = mnt.mkvm()
    parent = vm.dir if where == "vm" else vm.path("vsock")
    assert errno_of(os.mkdir, os.path.join(parent, "sub")) == errno.EPERM


@pytest.mark.parametrize("where", ["root", "vm", "vsock"])
def test_creating_files_is_eperm(mnt, where):
    vm = mnt.mkvm()
    parent = {"root": mnt.mnt, "vm": vm.dir, "vsock": vm.path("vsock")}[where]
    p = os.path.join(parent, "newfile")
    assert errno_of(os.open, p, os.O_WRONLY | os.O_CREAT, 0o644) == errno.EPERM
    assert errno_of(os.mknod, p, 0o644 | stat.S_IFREG) == errno.EPERM
    assert errno_of(os.mkfifo, p) == errno.EPERM
    assert "newfile" not in fs(os.listdir, parent)


@pytest.mark.parametrize("where", ["root", "vm"])
def test_symlink_is_eperm(mnt, where):
    """Like configfs and the other ways of creating: EPERM, not ENOSYS (which `ln -s`
    reports as 'Function not implemented')."""
    vm = mnt.mkvm()
    p = os.path.join(mnt.mnt if where == "root" else vm.dir, "newlink")
    e = errno_of(os.symlink, "/etc/passwd", p)
    assert e == errno.EPERM, errname(e)


def test_open_existing_attribute_with_o_creat_works_but_o_excl_is_eexist(mnt):
    vm = mnt.mkvm()
    assert util.write_attr(vm.path("cpus"), "2", flags=os.O_CREAT | os.O_TRUNC) == 0
    assert vm.value("cpus") == "2"
    assert errno_of(os.open, vm.path("cpus"), os.O_WRONLY | os.O_CREAT | os.O_EXCL) == errno.EEXIST


@pytest.mark.parametrize("target", ["cpus", "state", "vsock/ctl", "vsock/ports", "vsock"])
def test_unlink_is_eperm(mnt, target):
    vm = mnt.mkvm()
    fn = os.rmdir if target == "vsock" else os.unlink
    e = errno_of(fn, vm.path(target))
    assert e == errno.EPERM, errname(e)
    assert fs(os.path.exists, vm.path(target))


def test_rename_is_eperm(mnt):
    vm = mnt.mkvm("old")
    assert errno_of(os.rename, vm.dir, os.path.join(mnt.mnt, "new")) == errno.EPERM
    assert errno_of(os.rename, vm.path("cpus"), vm.path("cpus2")) == errno.EPERM
    assert errno_of(os.rename, vm.path("cpus"), vm.path("memory")) == errno.EPERM
    assert fs(os.listdir, mnt.mnt) == ["old"]


def test_link_is_eperm(mnt):
    vm = mnt.mkvm()
    e = errno_of(os.link, vm.path("cpus"), vm.path("cpus2"))
    assert e == errno.EPERM, errname(e)


def test_rmdir_of_stopped_vm_removes_it_and_name_is_reusable_with_defaults(mnt):
    vm = mnt.mkvm("gone")
    assert vm.write("cpus", "3") == 0
    assert errno_of(os.rmdir, vm.dir) == 0
    assert fs(os.listdir, mnt.mnt) == []
    assert errno_of(os.stat, vm.dir) == errno.ENOENT
    vm = mnt.mkvm("gone")
    assert vm.value("cpus") == "1"


def test_rmdir_of_missing_vm_is_enoent(mnt):
    assert errno_of(os.rmdir, os.path.join(mnt.mnt, "nothere")) == errno.ENOENT


def test_open_file_of_removed_vm_fails_cleanly(mnt):
    vm = mnt.mkvm()
    fd = fs(os.open, vm.path("cpus"), os.O_RDWR)
    try:
        assert errno_of(os.rmdir, vm.dir) == 0
        # whatever the read, write or poll gives, it must not hang or crash the daemon
        for op in (lambda: os.pread(fd, 100, 0), lambda: os.pwrite(fd, b"2", 0)):
            try:
                util.call_with_timeout(op)
            except OSError:
                pass
        p = select.poll()
        p.register(fd, select.POLLPRI | select.POLLIN)
        util.call_with_timeout(p.poll, 1000)
    finally:
        os.close(fd)
    assert fs(os.listdir, mnt.mnt) == []


def test_rmdir_of_running_vm_is_ebusy_with_sentence(mnt, guest):
    vm = mnt.mkvm()
    vm.start()
    try:
        e = errno_of(os.rmdir, vm.dir)
        assert e == errno.EBUSY, errname(e)
        err = vm.error()
        assert err.strip() and err.count("\n") <= 1, repr(err)
        assert fs(os.path.isdir, vm.dir)
        assert vm.state() == "running"
    finally:
        vm.kill()
    assert errno_of(os.rmdir, vm.dir) == 0


def test_root_owner_may_chmod_root_to_1777_and_back(mnt):
    assert errno_of(os.chmod, mnt.mnt, 0o1777) == 0
    assert stat.S_IMODE(fs(os.stat, mnt.mnt).st_mode) == 0o1777
    assert errno_of(os.chmod, mnt.mnt, 0o755) == 0
    assert stat.S_IMODE(fs(os.stat, mnt.mnt).st_mode) == 0o755


@pytest.mark.parametrize("target", ["", "cpus", "console", "vsock", "vsock/ctl"])
def test_chmod_of_vm_files_is_eperm(mnt, target):
    vm = mnt.mkvm()
    p = vm.path(target) if target else vm.dir
    before = fs(os.stat, p).st_mode
    e = errno_of(os.chmod, p, 0o777)
    assert e == errno.EPERM, errname(e)
    assert fs(os.stat, p).st_mode == before


@pytest.mark.parametrize("target", ["root", "vm", "cpus"])
def test_chown_is_eperm(mnt, target):
    vm = mnt.mkvm()
    p = {"root": mnt.mnt, "vm": vm.dir, "cpus": vm.path("cpus")}[target]
    e = errno_of(os.chown, p, 12345, 12345)
    assert e == errno.EPERM, errname(e)
    assert fs(os.stat, p).st_uid == os.getuid()


def test_truncate_is_a_no_op(mnt):
    vm = mnt.mkvm()
    assert vm.write("memory", "256") == 0
    assert errno_of(os.truncate, vm.path("memory"), 0) == 0
    assert vm.value("memory") == "256"
    fd = fs(os.open, vm.path("memory"), os.O_WRONLY | os.O_TRUNC)
    os.close(fd)
    assert vm.value("memory") == "256"


# ---- a second user (needs root) ----------------------------------------------------------

def _shared_mount(mount_factory):
    m = mount_factory(["allow_other"])
    os.chmod(m.mnt, 0o1777)
    # the tmp dirs above the mount point must be searchable by the other user
    d = os.path.dirname(m.mnt)
    while d != "/":
        st = os.stat(d)
        if not st.st_mode & 0o001:
            os.chmod(d, stat.S_IMODE(st.st_mode) | 0o001)
        d = os.path.dirname(d)
    return m


def test_without_sticky_root_other_user_cannot_mkdir(as_root, mount_factory):
    m = _shared_mount(mount_factory)
    os.chmod(m.mnt, 0o755)
    uid, gid = util.NOBODY
    e = util.run_as(uid, gid, f"os.mkdir({os.path.join(m.mnt, 'theirs')!r})")
    assert e == errno.EACCES, errname(e)


def test_other_user_vm_in_1777_root_belongs_to_them(as_root, mount_factory):
    m = _shared_mount(mount_factory)
    uid, gid = util.NOBODY
    p = os.path.join(m.mnt, "theirs")
    assert util.run_as(uid, gid, f"os.mkdir({p!r})") == 0
    for f in ["", "cpus", "console", "vsock", "vsock/ctl"]:
        st = fs(os.stat, os.path.join(p, f))
        assert (st.st_uid, st.st_gid) == (uid, gid), f
    # they configure it
    assert util.run_as(uid, gid, f"fd = os.open({p + '/cpus'!r}, os.O_WRONLY)\n"
                                 "os.write(fd, b'2')\nos.close(fd)") == 0
    assert m.vm("theirs").value("cpus") == "2"
    # only the root's owner changes the root's mode
    e = util.run_as(uid, gid, f"os.chmod({m.mnt!r}, 0o755)")
    assert e == errno.EPERM, errname(e)
    assert stat.S_IMODE(fs(os.stat, m.mnt).st_mode) == 0o1777
    # they remove their own VM
    assert util.run_as(uid, gid, f"os.rmdir({p!r})") == 0
    assert fs(os.listdir, m.mnt) == []


def test_other_user_cannot_touch_someone_elses_vm(as_root, mount_factory):
    m = _shared_mount(mount_factory)
    vm = m.mkvm("mine")
    uid, gid = util.NOBODY
    # world-readable attributes are readable
    assert util.run_as(uid, gid, f"result = open({vm.path('state')!r}).read()") == "stopped\n"
    # owner-only files and writes are not
    for f in ("console", "log", "error"):
        e = util.run_as(uid, gid, f"open({vm.path(f)!r}).read()")
        assert e == errno.EACCES, (f, errname(e))
    for f, v in (("cpus", "2"), ("ctl", "start"), ("vsock/ctl", "listen 5")):
        e = util.run_as(uid, gid, f"fd = os.open({vm.path(f)!r}, os.O_WRONLY)\n"
                                  f"os.write(fd, {v.encode()!r})\nos.close(fd)")
        assert e == errno.EACCES, (f, errname(e))
    assert vm.value("cpus") == "1" and vm.state() == "stopped"
    # the sticky root: only the owner removes a VM (EPERM, as rmdir(2) in /tmp)
    e = util.run_as(uid, gid, f"os.rmdir({vm.dir!r})")
    assert e == errno.EPERM, errname(e)
    assert fs(os.path.isdir, vm.dir)


# ---- many VMs, many threads --------------------------------------------------------------

def test_hundreds_of_vms_are_listed_once_each_with_unique_cids(mnt):
    names = [f"vm{i:03d}" for i in range(300)]
    for n in names:
        fs(os.mkdir, os.path.join(mnt.mnt, n))
    listed = fs(os.listdir, mnt.mnt)  # several readdir calls, with offsets
    assert sorted(listed) == names
    cids = [util.read_attr(os.path.join(mnt.mnt, n, "cid")) for n in names]
    assert len(set(cids)) == len(names)
    for n in names[::2]:
        fs(os.rmdir, os.path.join(mnt.mnt, n))
    assert sorted(fs(os.listdir, mnt.mnt)) == names[1::2]


def test_parallel_mkdir_write_read_rmdir_from_threads(mnt):
    """The daemon's locking: eight threads, each with its own VMs, hammering at once."""
    errors = []

    def worker(k):
        try:
            for i in range(25):
                vm = util.VM(mnt.mnt, f"t{k}-{i}")
                os.mkdir(vm.dir)
                for attr, v in (("cpus", str(1 + i % 8)), ("memory", str(64 + i)),
                                ("cmdline", f"console=ttyS0 t={k}.{i}")):
                    e = util.write_attr(vm.path(attr), v)
                    assert e == 0, (vm.name, attr, errname(e))
                    assert vm.value(attr) == v, (vm.name, attr)
                assert util.write_attr(vm.path("vsock", "ctl"), f"listen {i}") == 0
                assert vm.state() == "stopped"
                if i % 3:
                    os.rmdir(vm.dir)
        except BaseException as e:
            errors.append(f"thread {k}: {e!r}")

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a worker hung"
    assert errors == []
    left = sorted(fs(os.listdir, mnt.mnt))
    assert left == sorted(f"t{k}-{i}" for k in range(8) for i in range(25) if i % 3 == 0)


@pytest.mark.parametrize("target", ["state", "pid", "log", "error", "vsock/ports"])
def test_read_only_files_refuse_writes(mnt, target):
    """Even root (who passes mode checks) cannot write a value that is only shown."""
    vm = mnt.mkvm()
    before = util.read_bytes(vm.path(target))
    e = util.write_attr(vm.path(target), "running\n")
    assert e != 0, f"writing {target} succeeded"
    assert util.read_bytes(vm.path(target)) == before or target == "error"
