"""capsafs and containers (issue "Hardening", item 5): a mount used from another mount
namespace through a bind mount (what `-v /vms:/vms` gives a container), capsafs itself running
inside a user+mount namespace (a rootless container), and capsafs run by an unprivileged user
through fusermount3 (the SPEC's rootless mode).  contrib/container/ has the podman/docker
example these model.

Each variant runs a small Python program (NS_PROGRAM below) inside the namespace; it uses
util.py, prints one JSON line, and cleans up after itself.  The test keeps the pids it must
kill if that program overruns.  A variant the host cannot run is skipped with the precise
reason (which device or syscall refused, and why); nothing else is skipped.

Needs root (to make namespaces and act as nobody)."""

import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile

import pytest

import util

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
NOBODY_UID, NOBODY_GID = util.NOBODY
RUN_TIMEOUT = util.BOOT_TIMEOUT + 90

pytestmark = pytest.mark.usefixtures("as_root")

# Runs inside the namespace.  argv[1]: JSON config.  Modes:
#   bind:   bind-mount cfg.mnt at cfg.bind, make a VM there, boot it, vsock through it
#   daemon: run capsafs at cfg.mnt (as whoever we are), mkdir, boot, read the console
NS_PROGRAM = r'''
import json, os, subprocess, sys, time, uuid
cfg = json.loads(sys.argv[1])
sys.path.insert(0, cfg["tests"])
import util

res = {"uid": os.getuid(), "uid_map": open("/proc/self/uid_map").read().split()}
tag = uuid.uuid4().hex[:10]


def boot_and_talk(root, use_vsock):
    vm = util.VM(root, "v-" + tag[:6])
    os.mkdir(vm.dir)
    st = os.stat(vm.dir)
    res["owner"] = [st.st_uid, st.st_gid]
    res["vm"] = vm.name
    if use_vsock:
        e = vm.write("vsock/ctl", "listen 1024")
        assert e == 0, f"listen 1024: {util.errname(e)}: {vm.error()}"
    con = vm.boot()
    try:
        res["console"] = con.check(f"echo in-ns-{tag}")
        if use_vsock:
            # the host accepts on the bind-mounted node while the guest's socat runs
            import threading

            def host_side():
                fd = util.fs(os.open, vm.path("vsock", "1024"), os.O_RDWR, timeout=60)
                try:
                    got = b""
                    while not got.endswith(b"\n"):
                        chunk = util.call_with_timeout(os.read, fd, 4096, timeout=30,
                                                       what="read vsock/1024")
                        if not chunk:
                            break
                        got += chunk
                    res["from_guest"] = got.decode()
                    util.call_with_timeout(os.write, fd, f"reply-{tag}\n".encode(),
                                           what="write vsock/1024")
                finally:
                    os.close(fd)

            box = {}

            def run_host():
                try:
                    host_side()
                except BaseException as e:
                    box["error"] = e

            t = threading.Thread(target=run_host, daemon=True)
            t.start()
            res["guest_got"] = con.check(f"echo hello-{tag} | socat -t 10 - VSOCK-CONNECT:2:1024",
                                         timeout=60)
            t.join(60)
            if "error" in box:
                raise box["error"]
    finally:
        con.close()
        vm.kill()
    res["tag"] = tag
    return vm


def main():
    if cfg["mode"] == "bind":
        subprocess.run(["mount", "--bind", cfg["mnt"], cfg["bind"]], check=True)
        try:
            e = util.mount_entry(cfg["bind"])
            res["bind_fstype"] = e and e["fstype"]
            boot_and_talk(cfg["bind"], True)
        finally:
            subprocess.run(["umount", cfg["bind"]], check=False)
        return
    d = util.Daemon(cfg["exe"], cfg["mnt"], cfg["workdir"], cfg["options"])
    try:
        try:
            d.start(wait=False)
            with open(cfg["pidfile"], "w") as f:
                f.write(str(d.pid))
            d.wait_mounted()
        except AssertionError:
            res["mount_failed"] = d.stderr()
            return
        res["fstype"] = util.mount_entry(cfg["mnt"])["fstype"]
        boot_and_talk(d.mnt, False)
    finally:
        d.expect_exit_failure = "mount_failed" in res
        res["problems"] = d.cleanup()


try:
    main()
except BaseException as e:
    import traceback
    res["exception"] = traceback.format_exc()
print("RESULT " + json.dumps(res))
'''


def _open_path_to(path):
    d = os.path.dirname(os.path.abspath(path))
    while d != "/":
        st = os.stat(d)
        if not st.st_mode & 0o001:
            os.chmod(d, stat.S_IMODE(st.st_mode) | 0o001)
        d = os.path.dirname(d)


def _kill_pid(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class Runner:
    """Runs NS_PROGRAM under a launcher; kills what it started (by pid) at the end."""

    def __init__(self, tmp_path):
        self.dir = str(tmp_path)
        self.prog = os.path.join(self.dir, "ns_program.py")
        with open(self.prog, "w") as f:
            f.write(NS_PROGRAM)
        os.chmod(self.prog, 0o644)
        self.pidfiles = []
        self.mounts = []  # host-side paths to lazily unmount if still mounted

    def run(self, launcher, cfg, user=None, timeout=RUN_TIMEOUT):
        cfg = dict(cfg, tests=TESTS_DIR)
        if "pidfile" in cfg:
            self.pidfiles.append(cfg["pidfile"])
        kw = {}
        if user:
            kw = dict(user=user[0], group=user[1], extra_groups=[])
        p = subprocess.Popen(launcher + [sys.executable, self.prog, json.dumps(cfg)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd="/", start_new_session=True, **kw)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.cleanup()
            _kill_pid(p.pid)
            out, err = p.communicate(timeout=30)
            pytest.fail(f"the namespace program ran over {timeout} s; stderr:\n{err[-3000:]}")
        for line in out.splitlines():
            if line.startswith("RESULT "):
                return json.loads(line[7:]), err
        pytest.fail(f"the namespace program printed no result (status {p.returncode});\n"
                    f"stdout:\n{out[-2000:]}\nstderr:\n{err[-3000:]}")

    def cleanup(self):
        for pf in self.pidfiles:
            try:
                with open(pf) as f:
                    pid = int(f.read().strip() or 0)
            except (OSError, ValueError):
                continue
            if pid and util.pid_alive(pid):
                _kill_pid(pid)
        for m in self.mounts:
            if util.is_mounted(m):
                subprocess.run([util.FUSERMOUNT, "-uz", m], capture_output=True, timeout=30)


@pytest.fixture
def runner(tmp_path):
    r = Runner(tmp_path)
    yield r
    r.cleanup()


def _check_booted(res, err):
    assert "exception" not in res, res["exception"] + "\nstderr:\n" + err[-2000:]
    assert f"in-ns-{res['tag']}\n" in res["console"], res


# ---- a bind mount in another mount namespace ----------------------------------------------

@pytest.mark.watchdog(360)
def test_bind_mount_in_another_mount_namespace_boots_and_serves_vsock(mount_factory,
                                                                       guest_options,
                                                                       runner, tmp_path):
    m = mount_factory(guest_options)
    bind = tmp_path / "bound"
    bind.mkdir()
    res, err = runner.run(["unshare", "-m", "--propagation", "private"],
                          {"mode": "bind", "mnt": m.mnt, "bind": str(bind)})
    assert "exception" not in res, res["exception"] + "\nstderr:\n" + err[-2000:]
    assert res["bind_fstype"] == "fuse.capsafs"
    _check_booted(res, err)
    assert res["from_guest"] == f"hello-{res['tag']}\n", res
    assert f"reply-{res['tag']}" in res["guest_got"], res
    # the bind mount lived in the other namespace only; the VM it made is the mount's
    assert not util.is_mounted(str(bind))
    assert os.listdir(bind) == []
    assert res["vm"] in fs_listdir(m.mnt)
    assert m.vm(res["vm"]).state() == "stopped"


def fs_listdir(p):
    return util.fs(os.listdir, p)


# ---- capsafs inside a user+mount namespace ------------------------------------------------

def _daemon_cfg(capsafs_exe, guest, base, owner=None):
    """Mount point, work dir and socket dir for a daemon in a namespace, owned by `owner`."""
    mnt = os.path.join(base, "mnt")
    work = os.path.join(base, "work")
    os.makedirs(mnt)
    os.makedirs(work)
    sockdir = tempfile.mkdtemp(prefix="csfs-ns-", dir="/tmp")
    if owner:
        for p in (base, mnt, work, sockdir):
            os.chown(p, *owner)
        _open_path_to(mnt)
    return {"mode": "daemon", "exe": capsafs_exe, "mnt": mnt, "workdir": work,
            "pidfile": os.path.join(work, "daemon.pid"),
            "options": [f"sockdir={sockdir}", f"kernel={guest}/vmlinuz",
                        f"initrd={guest}/initrd.img"]}, sockdir


def _probe(cmd, user=None):
    """(returncode, stderr) of a short probe command."""
    kw = dict(user=user[0], group=user[1], extra_groups=[]) if user else {}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd="/", **kw)
    return r.returncode, (r.stderr.strip() or r.stdout.strip())


FUSE_OPEN = [sys.executable, "-c", "import os; os.close(os.open('/dev/fuse', os.O_RDWR))"]


@pytest.fixture
def debian_fuse_mode():
    """Debian's udev rule gives /dev/fuse mode 0666, which rootless FUSE relies on; some
    container hosts hand it over as 0600.  As root, give it the Debian mode for the test
    and put the original back afterwards."""
    st = os.stat("/dev/fuse")
    mode = stat.S_IMODE(st.st_mode)
    changed = os.geteuid() == 0 and mode & 0o006 != 0o006
    if changed:
        os.chmod("/dev/fuse", 0o666)
    yield
    if changed:
        os.chmod("/dev/fuse", mode)


def _dev_fuse_mode():
    st = os.stat("/dev/fuse")
    return (f"/dev/fuse is mode {stat.S_IMODE(st.st_mode):04o} "
            f"{pwd.getpwuid(st.st_uid).pw_name}:{st.st_gid}")


@pytest.mark.watchdog(360)
@pytest.mark.parametrize("who", ["root", "nobody"])
def test_capsafs_runs_inside_a_user_and_mount_namespace(capsafs_exe, guest, runner, tmp_path,
                                                        who, debian_fuse_mode):
    """`unshare -Urm` (root, or nobody mapped to root in the namespace — a rootless
    container): capsafs mounts there, a VM is made, boots, and its console answers."""
    user = None if who == "root" else (NOBODY_UID, NOBODY_GID)
    rc, msg = _probe(["unshare", "-Urm", "true"], user)
    if rc != 0:
        pytest.skip(f"this host does not let {who} create a user namespace: unshare -Urm: {msg}")
    rc, msg = _probe(["unshare", "-Urm"] + FUSE_OPEN, user)
    if rc != 0:
        if "Permission denied" in msg:
            pytest.skip(f"{who} cannot open /dev/fuse in a user namespace ({_dev_fuse_mode()}; "
                        "the namespace does not change the device's permission check)")
        pytest.fail(f"opening /dev/fuse as {who} in a user namespace failed unexpectedly: {msg}")
    cfg, sockdir = _daemon_cfg(capsafs_exe, guest, str(tmp_path / "ns"), user)
    runner.mounts.append(cfg["mnt"])
    try:
        res, err = runner.run(["unshare", "-Urm"], cfg, user)
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)
    if "mount_failed" in res:
        pytest.fail(f"capsafs could not mount in the user namespace:\n{res['mount_failed']}")
    _check_booted(res, err)
    assert res["fstype"] == "fuse.capsafs"
    assert res["uid"] == 0 and res["owner"] == [0, 0], res  # root inside
    assert res["problems"] == [], res["problems"]
    assert not util.is_mounted(cfg["mnt"]), "the namespace's mount leaked to the host"


# ---- rootless: an unprivileged user with fusermount3 --------------------------------------

@pytest.mark.watchdog(360)
def test_unprivileged_user_runs_capsafs_through_fusermount3(capsafs_exe, guest, runner,
                                                            tmp_path, debian_fuse_mode):
    user = (NOBODY_UID, NOBODY_GID)
    fm = shutil.which("fusermount3")
    if not fm:
        pytest.fail("fusermount3 is not installed (apt-get install fuse3)")
    if not os.stat(fm).st_mode & stat.S_ISUID:
        pytest.skip(f"{fm} is not setuid root here, so no unprivileged user can mount")
    cfg, sockdir = _daemon_cfg(capsafs_exe, guest, str(tmp_path / "rootless"), user)
    runner.mounts.append(cfg["mnt"])
    try:
        res, err = runner.run([], cfg, user)
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)
    if "mount_failed" in res:
        why = res["mount_failed"]
        rc, msg = _probe(FUSE_OPEN, user)
        if "failed to open /dev/fuse: Permission denied" in why and rc != 0 \
                and "Permission denied" in msg:
            pytest.skip(f"nobody cannot open /dev/fuse ({_dev_fuse_mode()}), so fusermount3 "
                        f"refuses them: {why.strip().splitlines()[-1]}")
        pytest.fail(f"capsafs as nobody could not mount:\n{why}")
    _check_booted(res, err)
    assert res["fstype"] == "fuse.capsafs"
    assert res["owner"] == [NOBODY_UID, NOBODY_GID], res
    assert res["problems"] == [], res["problems"]
    assert not util.is_mounted(cfg["mnt"])


# ---- contrib/container (no container engine here: what can be checked without one) -------

def _contrib(name):
    """contrib/container/<name> from the source tree (srcdir may differ from the build)."""
    for top in (os.path.dirname(TESTS_DIR), os.environ.get("CAPSAFS_BUILDDIR", "")):
        p = os.path.join(top, "contrib", "container", name)
        if os.path.isfile(p):
            return p
    pytest.fail(f"contrib/container/{name} is missing")


def test_container_run_script_is_valid_posix_sh_and_passes_fuse_and_sys_admin():
    script = _contrib("run")
    for sh in ("sh", "dash", "bash"):
        if shutil.which(sh):
            r = subprocess.run([sh, "-n", script], capture_output=True, text=True)
            assert r.returncode == 0, f"{sh} -n {script}: {r.stderr}"
    if shutil.which("shellcheck"):
        r = subprocess.run(["shellcheck", "-s", "sh", script], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout
    for engine in ("podman", "docker"):
        r = subprocess.run([script, "print"], capture_output=True, text=True, timeout=10,
                           env=dict(os.environ, ENGINE=engine, KVM="no", VMS="/srv/v",
                                    SOCKDIR="/run/s", GUEST="/g"))
        assert r.returncode == 0, r.stderr
        argv = r.stdout.split()
        assert argv[:2] == [engine, "run"], argv
        for flag in (["--device", "/dev/fuse"], ["--cap-add", "SYS_ADMIN"],
                     ["--volume", "/run/s:/run/capsafs"], ["--volume", "/g:/guest:ro"],
                     ["--mount", "type=bind,source=/srv/v,target=/vms,bind-propagation=rshared"]):
            assert any(argv[j:j + 2] == flag for j in range(len(argv))), (flag, argv)
        assert "/dev/kvm" not in argv
    r = subprocess.run([script], capture_output=True, text=True, timeout=10)
    assert r.returncode == 2 and "run build" in r.stderr  # usage


def test_containerfile_entrypoint_is_a_command_line_capsafs_accepts(capsafs_exe, guest,
                                                                     tmp_path):
    """The Containerfile's ENTRYPOINT, with its container paths moved to temporary ones,
    is a command line capsafs accepts: it mounts, the VM made there defaults to the
    guest in /guest, and sockets go to the socket volume."""
    text = open(_contrib("Containerfile")).read()
    entry = cmd = None
    for line in text.splitlines():
        if line.startswith("ENTRYPOINT "):
            entry = json.loads(line[len("ENTRYPOINT "):])
        elif line.startswith("CMD "):
            cmd = json.loads(line[len("CMD "):])
    assert entry and cmd, "no ENTRYPOINT/CMD in the exec form"
    assert entry[:2] == ["capsafs", "-f"] and entry[2] == "-o", entry
    sock = tempfile.mkdtemp(prefix="csfs-ct-", dir="/tmp")
    opts = entry[3].replace("/run/capsafs", sock).replace("/guest", guest).split(",")
    assert "allow_other" in opts
    assert cmd == ["/vms"]
    d = util.Daemon(capsafs_exe, str(tmp_path / "vms"), str(tmp_path), opts)
    os.mkdir(d.mnt)
    try:
        d.start()
        vm = util.VM(d.mnt, "ct")
        util.fs(os.mkdir, vm.dir)
        assert vm.value("kernel") == f"{guest}/vmlinuz"
        assert vm.value("initrd") == f"{guest}/initrd.img"
    finally:
        problems = d.cleanup()
        shutil.rmtree(sock, ignore_errors=True)
    assert problems == [], problems
