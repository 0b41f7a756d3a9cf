"""Ownership and permissions with a second user (SPEC "Ownership and permissions", capsafs(1)
OWNERSHIP AND SECURITY): a shared mount (-o allow_other, root mode 1777), VMs of root, of
`nobody` and of a throwaway account, every access across owners refused with the exact errno,
exported sockets owner-only, kernel/initrd checked with the caller's credentials at write and
at start, and an unprivileged user booting and using a VM of their own.

test_tree.py already covers: mkdir by another user in a 1777 root (and EACCES without 1777),
ownership of their tree, reading console/log/error and writing cpus/ctl/vsock/ctl of root's
stopped VM, rmdir (EPERM) of it.  test_attrs.py covers: a root-only kernel/initrd and one behind
an unsearchable directory (EACCES at write), and a kernel swapped for a symlink to a root-only
file between write and start.  This module adds what those leave out.

Needs root (it acts as the other users)."""

import errno
import os
import shutil
import socket
import stat
import subprocess
import uuid

import pytest

import util
from util import errname, fs

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
NOBODY_UID, NOBODY_GID = util.NOBODY

pytestmark = pytest.mark.usefixtures("as_root")


def _open_path_to(path):
    """Make every directory above `path` searchable by others (pytest's tmp dirs are 0700)."""
    d = os.path.dirname(os.path.abspath(path))
    while d != "/":
        st = os.stat(d)
        if not st.st_mode & 0o001:
            os.chmod(d, stat.S_IMODE(st.st_mode) | 0o001)
        d = os.path.dirname(d)


def as_user(uid, gid, code, timeout=util.OP_TIMEOUT):
    """run_as with util importable by the code."""
    return util.run_as(uid, gid, f"sys.path.insert(0, {TESTS_DIR!r})\nimport util\n" + code,
                       timeout=timeout)


def write_as(uid, gid, path, value):
    """errno (0 on success) of one open(O_WRONLY)+write+close of `value` as uid/gid."""
    return util.run_as(uid, gid, f"fd = os.open({path!r}, os.O_WRONLY)\n"
                                 f"try:\n    os.write(fd, {value.encode()!r})\n"
                                 "finally:\n    os.close(fd)")


def connect_as(uid, gid, path):
    """errno (0 on success) of connect() to a Unix socket as uid/gid."""
    return util.run_as(uid, gid, "import socket\n"
                                 "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
                                 "s.settimeout(10)\n"
                                 f"try:\n    s.connect({path!r})\nfinally:\n    s.close()")


@pytest.fixture(scope="module")
def other_user():
    """A throwaway account (uid, gid), a third party to nobody's and root's VMs; removed at
    the end even when the tests fail."""
    name = "csfs-" + uuid.uuid4().hex[:8]
    r = subprocess.run(["useradd", "--system", "--no-create-home", "--user-group",
                        "--shell", "/usr/sbin/nologin", name], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"useradd {name}: {r.stderr.strip()}")
    try:
        import pwd
        pw = pwd.getpwnam(name)
        yield pw.pw_uid, pw.pw_gid
    finally:
        subprocess.run(["userdel", name], capture_output=True)
        subprocess.run(["groupdel", name], capture_output=True)  # if userdel left it


@pytest.fixture(scope="module")
def shared(module_mount_factory, guest, tmp_path_factory):
    """A mount with -o allow_other, root chmod 1777, kernel/initrd defaults in a root-only
    directory (other users name their own), and a socket directory that others may
    traverse (0711: each VM's own directory below it stays 0700 to its owner; the default
    0700 would keep every other user even from their own VMs' sockets)."""
    files = tmp_path_factory.mktemp("access-files")
    secret = files / "root-only"
    secret.mkdir(mode=0o700)
    shutil.copy(os.path.join(guest, "vmlinuz"), secret / "vmlinuz")
    shutil.copy(os.path.join(guest, "initrd.img"), secret / "initrd.img")
    m = module_mount_factory(["allow_other", f"kernel={secret}/vmlinuz",
                              f"initrd={secret}/initrd.img"])
    os.chmod(m.mnt, 0o1777)
    _open_path_to(m.mnt)
    os.chmod(m.sockdir, 0o711)
    # the guest image where nobody can read it
    pub = files / "public"
    pub.mkdir()
    for f in ("vmlinuz", "initrd.img"):
        shutil.copy(os.path.join(guest, f), pub / f)
        os.chmod(pub / f, 0o644)
    os.chmod(pub, 0o755)
    _open_path_to(str(pub / "vmlinuz"))
    m.public_kernel = str(pub / "vmlinuz")
    m.public_initrd = str(pub / "initrd.img")
    m.files = files
    return m


@pytest.fixture(scope="module")
def theirs(shared):
    """nobody's VM 'theirs', configured and started by nobody (the boot goes on while the
    first test waits for it)."""
    p = os.path.join(shared.mnt, "theirs")
    code = (f"os.mkdir({p!r})\n"
            f"for a, v in (('kernel', {shared.public_kernel!r}), "
            f"('initrd', {shared.public_initrd!r})):\n"
            f"    fd = os.open({p!r} + '/' + a, os.O_WRONLY)\n"
            "    os.write(fd, v.encode())\n"
            "    os.close(fd)\n"
            f"fd = os.open({p + '/vsock/ctl'!r}, os.O_WRONLY)\n"
            "os.write(fd, b'listen 1024')\nos.close(fd)\n"
            f"fd = os.open({p + '/ctl'!r}, os.O_WRONLY)\n"
            "os.write(fd, b'start')\nos.close(fd)")
    e = util.run_as(NOBODY_UID, NOBODY_GID, code, timeout=90)
    vm = shared.vm("theirs")
    assert e == 0, f"nobody could not set up and start their VM: {errname(e)}: {vm.error()!r}"
    return vm


@pytest.fixture(scope="module")
def mine(shared):
    """root's stopped VM."""
    return shared.mkvm("mine")


# ---- a second user boots and uses a VM of their own ---------------------------------------

@pytest.mark.watchdog(400)
def test_unprivileged_user_boots_own_vm_and_talks_through_its_console(shared, theirs):
    st = fs(os.stat, theirs.dir)
    assert (st.st_uid, st.st_gid) == (NOBODY_UID, NOBODY_GID)
    tag = uuid.uuid4().hex[:10]
    out = as_user(NOBODY_UID, NOBODY_GID,
                  f"con = util.Console({theirs.path('console')!r})\n"
                  f"con.wait_ready({util.BOOT_TIMEOUT})\n"
                  f"result = con.check('echo hi-{tag}; id -u')\n"
                  "con.close()", timeout=util.BOOT_TIMEOUT + 90)
    assert isinstance(out, str), f"console as nobody failed: {errname(out)}"
    assert f"hi-{tag}\n0\n" in out, out
    assert theirs.state() == "running"
    # nobody reads their own log, error and pid
    assert as_user(NOBODY_UID, NOBODY_GID,
                   f"result = open({theirs.path('log')!r}).read()\n"
                   "result = util.READY in result")
    assert util.run_as(NOBODY_UID, NOBODY_GID, f"result = open({theirs.path('error')!r}).read()") == ""


# ---- exported sockets ---------------------------------------------------------------------

def test_exported_sockets_are_0600_and_belong_to_the_vm_owner(shared, theirs):
    theirs.wait_state("running", 60)
    d = os.path.join(shared.sockdir, "theirs")
    st = os.stat(d)
    assert (st.st_uid, st.st_gid) == (NOBODY_UID, NOBODY_GID), d
    assert stat.S_IMODE(st.st_mode) == 0o700, oct(st.st_mode)
    for name in ("vsock.sock", "1024.sock"):
        st = os.lstat(os.path.join(d, name))
        assert stat.S_ISSOCK(st.st_mode), name
        assert stat.S_IMODE(st.st_mode) == 0o600, (name, oct(st.st_mode))
        assert (st.st_uid, st.st_gid) == (NOBODY_UID, NOBODY_GID), name


def test_owner_connects_to_own_sockets(shared, theirs):
    theirs.wait_state("running", 60)
    d = os.path.join(shared.sockdir, "theirs")
    for name in ("vsock.sock", "1024.sock"):
        assert connect_as(NOBODY_UID, NOBODY_GID, os.path.join(d, name)) == 0, name


def test_other_user_cannot_connect_to_someone_elses_sockets(shared, theirs, other_user):
    theirs.wait_state("running", 60)
    uid, gid = other_user
    d = os.path.join(shared.sockdir, "theirs")
    for name in ("vsock.sock", "1024.sock"):
        e = connect_as(uid, gid, os.path.join(d, name))
        assert e == errno.EACCES, (name, errname(e))
    # and the socket itself refuses them, not only the VM's 0700 directory
    os.chmod(d, 0o711)
    try:
        for name in ("vsock.sock", "1024.sock"):
            e = connect_as(uid, gid, os.path.join(d, name))
            assert e == errno.EACCES, (name, "with the directory searchable", errname(e))
    finally:
        os.chmod(d, 0o700)


def test_declared_socket_path_is_checked_with_the_callers_credentials(shared, theirs, tmp_path):
    """`listen PORT PATH` makes the daemon (root) bind PATH and replace a stale socket
    there: with the daemon's credentials a user could unlink and take over any socket on
    the host (a D-Bus or container-engine socket).  The caller must be able to create PATH
    themselves: a directory they cannot write is EACCES, and what is there stays."""
    theirs.wait_state("running", 60)
    rootdir = tmp_path / "root-sockets"
    rootdir.mkdir(mode=0o755)
    os.chmod(rootdir, 0o755)
    _open_path_to(str(rootdir / "x"))
    victim = str(rootdir / "victim.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(victim)
    srv.listen(1)
    ino = os.lstat(victim).st_ino
    fresh = str(rootdir / "fresh.sock")
    ctl = theirs.path("vsock", "ctl")
    try:
        seen = {}
        for line in (f"listen 3000 {victim}", f"connect 3001 {fresh}"):
            e = write_as(NOBODY_UID, NOBODY_GID, ctl, line)
            seen[line] = errname(e)
            if e == 0:  # what the daemon did, then undo it
                st = os.lstat(line.split()[2])
                seen[line] += (f" (socket bound, owner uid {st.st_uid}, "
                               f"{'a new inode' if st.st_ino != ino else 'same inode'})")
                write_as(NOBODY_UID, NOBODY_GID, ctl, f"close {line.split()[1]}")
        seen["root's socket"] = ("kept" if os.path.lexists(victim)
                                 and os.lstat(victim).st_ino == ino else "replaced or removed")
        assert seen == {f"listen 3000 {victim}": "EACCES", f"connect 3001 {fresh}": "EACCES",
                        "root's socket": "kept"}, seen
        assert not os.path.lexists(fresh), "the daemon created a socket where nobody cannot"
        # a path in a directory the caller owns is fine
        own = tmp_path / "nobody-sockets"
        own.mkdir()
        os.chown(own, NOBODY_UID, NOBODY_GID)
        path = str(own / "mine.sock")
        assert write_as(NOBODY_UID, NOBODY_GID, ctl, f"connect 3002 {path}") == 0
        try:
            st = os.lstat(path)
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (NOBODY_UID, 0o600)
        finally:
            assert write_as(NOBODY_UID, NOBODY_GID, ctl, "close 3002") == 0
    finally:
        srv.close()


# ---- another user's VM --------------------------------------------------------------------

@pytest.mark.parametrize("attr,value", [("kernel", None), ("initrd", None),
                                        ("cmdline", "console=ttyS0 quiet"),
                                        ("memory", "256"), ("cid", "777")])
def test_other_user_cannot_write_someone_elses_config_but_the_owner_can(shared, mine,
                                                                         attr, value):
    value = value or {"kernel": shared.public_kernel, "initrd": shared.public_initrd}[attr]
    before = mine.read(attr)
    e = write_as(NOBODY_UID, NOBODY_GID, mine.path(attr), value)
    assert e == errno.EACCES, errname(e)
    assert mine.read(attr) == before
    # the owner can
    assert mine.write(attr, value) == 0, mine.error()
    assert mine.value(attr) == value
    assert mine.write(attr, before.rstrip("\n") or "\n") == 0


def test_other_user_cannot_control_read_or_remove_a_running_vm(shared, theirs, other_user):
    theirs.wait_state("running", 60)
    uid, gid = other_user
    pid = theirs.pid()
    for cmd in ("kill", "stop", "restart", "start"):
        e = write_as(uid, gid, theirs.path("ctl"), cmd)
        assert e == errno.EACCES, (cmd, errname(e))
    for f in ("kernel", "cmdline", "cpus"):
        e = write_as(uid, gid, theirs.path(f), "1")
        assert e == errno.EACCES, (f, errname(e))
    for f in ("console", "log", "error"):
        e = util.run_as(uid, gid, f"open({theirs.path(f)!r}).read()")
        assert e == errno.EACCES, (f, errname(e))
    e = util.run_as(uid, gid, f"os.close(os.open({theirs.path('console')!r}, os.O_WRONLY))")
    assert e == errno.EACCES, ("console for writing", errname(e))
    # sticky root: not theirs to remove, running or not (EPERM before EBUSY)
    e = util.run_as(uid, gid, f"os.rmdir({theirs.dir!r})")
    assert e == errno.EPERM, errname(e)
    assert theirs.state() == "running" and theirs.pid() == pid


@pytest.mark.parametrize("port,flags", [("1024", "os.O_RDWR"), ("1024", "os.O_RDONLY"),
                                        ("2000", "os.O_RDWR"),
                                        ("1024", "os.O_RDWR | os.O_NONBLOCK")])
def test_other_user_cannot_open_someone_elses_vsock_nodes(shared, theirs, other_user,
                                                          port, flags):
    """1024 is a declared listen port (an open would accept the guest's next connection),
    2000 an undeclared one (an open would dial the guest)."""
    theirs.wait_state("running", 60)
    uid, gid = other_user
    e = util.run_as(uid, gid, f"os.close(os.open({theirs.path('vsock', port)!r}, {flags}))")
    assert e == errno.EACCES, errname(e)


def test_owner_opens_own_vsock_nodes(shared, theirs):
    """The owner passes the permission check: nothing is queued on 1024 (EAGAIN) and
    nothing listens on the guest's port 2000 (ECONNREFUSED)."""
    theirs.wait_state("running", 60)
    e = util.run_as(NOBODY_UID, NOBODY_GID,
                    f"os.close(os.open({theirs.path('vsock', '1024')!r}, "
                    "os.O_RDWR | os.O_NONBLOCK))")
    assert e == errno.EAGAIN, errname(e)
    e = util.run_as(NOBODY_UID, NOBODY_GID,
                    f"os.close(os.open({theirs.path('vsock', '2000')!r}, os.O_RDWR))")
    assert e == errno.ECONNREFUSED, errname(e)


def test_vsock_node_of_a_stopped_vm_is_eacces_for_others_before_enotconn(shared, mine):
    """The permission check comes first: another user learns nothing from the state."""
    assert mine.write("vsock/ctl", "listen 1024") == 0, mine.error()
    try:
        for port in ("1024", "2000"):
            e = util.run_as(NOBODY_UID, NOBODY_GID,
                            f"os.close(os.open({mine.path('vsock', port)!r}, os.O_RDWR))")
            assert e == errno.EACCES, (port, errname(e))
        assert util.errno_of(os.open, mine.path("vsock", "2000"), os.O_RDWR) == errno.ENOTCONN
    finally:
        assert mine.write("vsock/ctl", "close 1024") == 0


# ---- kernel/initrd: the caller's credentials, again at start ------------------------------

@pytest.mark.parametrize("attr,how", [("kernel", "chmod-file"), ("initrd", "chmod-file"),
                                      ("kernel", "chmod-dir")])
def test_image_made_unreadable_after_write_is_refused_at_start(shared, tmp_path, attr, how):
    """Readable by nobody when written; then the file (or its directory) is made root-only;
    nobody's start fails with EACCES and nothing boots.  (test_attrs.py has the variant where
    the file is swapped for a symlink.)"""
    d = tmp_path / "imgs"
    d.mkdir()
    os.chmod(d, 0o755)
    _open_path_to(str(d / "x"))
    img = {}
    for f in ("vmlinuz", "initrd.img"):
        img[f] = d / f
        img[f].write_bytes(b"not a kernel\n")
        os.chmod(img[f], 0o644)
    name = "late-" + uuid.uuid4().hex[:6]
    vmdir = os.path.join(shared.mnt, name)
    assert util.run_as(NOBODY_UID, NOBODY_GID, f"os.mkdir({vmdir!r})") == 0
    vm = shared.vm(name)
    try:
        assert write_as(NOBODY_UID, NOBODY_GID, vm.path("kernel"), str(img["vmlinuz"])) == 0
        assert write_as(NOBODY_UID, NOBODY_GID, vm.path("initrd"), str(img["initrd.img"])) == 0
        target = img["vmlinuz" if attr == "kernel" else "initrd.img"]
        if how == "chmod-file":
            os.chmod(target, 0o600)
        else:
            os.chmod(d, 0o700)
        e = write_as(NOBODY_UID, NOBODY_GID, vm.path("ctl"), "start")
        assert e == errno.EACCES, errname(e)
        assert vm.state() == "stopped", vm.state()
        assert vm.value("pid") == ""
        assert str(target) in vm.error() or vm.error().strip(), vm.error()
        # root, who can read it, could start it: the check is the caller's, not the daemon's
        assert os.access(target, os.R_OK)
    finally:
        vm.kill()
        fs(os.rmdir, vm.dir)

