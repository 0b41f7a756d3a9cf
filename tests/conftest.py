"""Fixtures for the capsafs tests: the build, the guest image, mounts, booted guests.

Every mount is made by a fixture whose finalizer kills the VMs, unmounts, reaps the daemon
(SIGKILL and a lazy unmount as the last resort) and then checks that it exited cleanly and
printed no warnings it should not have.  A per-test watchdog (ini option
capsafs_test_timeout, marker `watchdog(seconds)`) kills the daemons of a test that overruns,
so a hung request fails the test instead of hanging the run.
"""

import os
import shutil
import sys
import tempfile
import threading
import time
import uuid

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import util  # noqa: E402
from util import VM, Daemon  # noqa: E402

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def pytest_addoption(parser):
    parser.addini("capsafs_test_timeout",
                  "seconds one test (setup, call and teardown) may take before the watchdog "
                  "SIGKILLs the capsafs daemons", default="240")


def pytest_configure(config):
    config.addinivalue_line("markers", "watchdog(seconds): this test's watchdog limit")


# ---- the watchdog ------------------------------------------------------------------------

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    m = item.get_closest_marker("watchdog")
    limit = float(m.args[0]) if m else float(item.config.getini("capsafs_test_timeout"))
    fired = []

    def fire():
        daemons = util.emergency_kill_all()
        fired.append(f"watchdog: {item.nodeid} ran over {limit:.0f} s; SIGKILLed "
                     f"{len(daemons)} capsafs daemon(s) to unblock it")
        sys.stderr.write("\n" + fired[-1] + "\n")

    timer = threading.Timer(limit, fire)
    timer.daemon = True
    item._capsafs_watchdog = fired
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    fired = getattr(item, "_capsafs_watchdog", None)
    if fired and rep.when == "call":
        rep.outcome = "failed"
        rep.sections.append(("watchdog", fired[0]))


# ---- paths -------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def builddir():
    d = os.environ.get("CAPSAFS_BUILDDIR") or os.path.dirname(TESTS_DIR)
    exe = os.path.join(d, "src", "capsafs")
    if not os.access(exe, os.X_OK):
        pytest.fail(f"no capsafs binary at {exe}: build it (make) or set CAPSAFS_BUILDDIR")
    return os.path.abspath(d)


@pytest.fixture(scope="session")
def capsafs_exe(builddir):
    return os.path.join(builddir, "src", "capsafs")


def _guest_dir():
    return os.environ.get("CAPSAFS_GUEST") or os.path.join(
        os.environ.get("CAPSAFS_BUILDDIR") or os.path.dirname(TESTS_DIR), "guest")


@pytest.fixture(scope="session")
def guest():
    """The directory holding the test guest's vmlinuz and initrd.img."""
    d = os.path.abspath(_guest_dir())
    missing = [f for f in ("vmlinuz", "initrd.img") if not os.path.isfile(os.path.join(d, f))]
    if missing:
        pytest.fail(f"guest image missing in {d} ({', '.join(missing)}): run `make guest` "
                    "or point CAPSAFS_GUEST at a directory with vmlinuz and initrd.img")
    if not shutil.which("qemu-system-x86_64"):
        pytest.fail("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    return d


@pytest.fixture(scope="session")
def guest_options(guest):
    return [f"kernel={guest}/vmlinuz", f"initrd={guest}/initrd.img"]


# ---- mounts ------------------------------------------------------------------------------

class Mount(Daemon):
    """A Daemon plus what the tests know about its mount."""

    def __init__(self, exe, base, options=(), args=(), sockdir=True):
        os.makedirs(base, exist_ok=True)
        mnt = tempfile.mkdtemp(prefix="mnt-", dir=base)
        options = list(options)
        # Unix socket paths are limited to 108 bytes: keep the socket directory short.
        self.sockdir = tempfile.mkdtemp(prefix="csfs-", dir="/tmp") if sockdir else None
        if self.sockdir:
            options.insert(0, f"sockdir={self.sockdir}")
        super().__init__(exe, mnt, base, options, args)

    def vm(self, name):
        return VM(self.mnt, name)

    def mkvm(self, name=None):
        name = name or "vm-" + uuid.uuid4().hex[:8]
        util.fs(os.mkdir, os.path.join(self.mnt, name))
        return self.vm(name)

    def cleanup(self):
        problems = super().cleanup()
        # our own socket directory, or the daemon's default one if it left it behind
        shutil.rmtree(self.sockdir or util.default_sockdir(self.mnt), ignore_errors=True)
        return problems


class MountFactory:
    def __init__(self, exe, base):
        self.exe = exe
        self.base = base
        self.mounts = []

    def __call__(self, options=(), args=(), wait=True, sockdir=True):
        m = Mount(self.exe, self.base, options, args, sockdir)
        self.mounts.append(m)
        m.start(wait=wait)
        return m

    def cleanup(self):
        problems = []
        for m in reversed(self.mounts):
            problems += m.cleanup()
        self.mounts.clear()
        return problems


def _finish(factory):
    problems = factory.cleanup()
    if problems:
        pytest.fail("cleanup: " + "\n".join(problems), pytrace=False)


@pytest.fixture
def mount_factory(capsafs_exe, tmp_path):
    """make(options=[...], args=[...]) -> Mount; every mount is undone at teardown."""
    f = MountFactory(capsafs_exe, str(tmp_path))
    yield f
    _finish(f)


@pytest.fixture
def mnt(mount_factory):
    """A fresh mount with its own socket directory; kernel/initrd default to the test guest
    when it exists."""
    d = _guest_dir()
    opts = []
    if os.path.isfile(os.path.join(d, "vmlinuz")):
        opts = [f"kernel={os.path.abspath(d)}/vmlinuz", f"initrd={os.path.abspath(d)}/initrd.img"]
    return mount_factory(opts)


@pytest.fixture(scope="module")
def module_mount_factory(capsafs_exe, tmp_path_factory):
    f = MountFactory(capsafs_exe, str(tmp_path_factory.mktemp("mod")))
    yield f
    _finish(f)


class Booted:
    """A mount and one VM booted to the guest's shell, shared by the tests of a module.
    Tests that stop it are fine: ready() boots it again when needed."""

    def __init__(self, mount, name="guest", config=None):
        self.mount = mount
        self.vm = mount.mkvm(name)
        self.console = None
        for attr, value in (config or {}).items():
            e = self.vm.write(attr, value)
            assert e == 0, f"configuring {name}: {attr}={value!r}: {util.errname(e)}"

    def ready(self):
        """The VM running with a shell that answers; return its Console."""
        if self.mount.proc.poll() is not None:
            pytest.fail(f"the module's capsafs died earlier (status {self.mount.proc.returncode})")
        if self.vm.state() == "running":
            if self.console:
                try:
                    self.console.run("true", timeout=5)
                    return self.console
                except util.Timeout:
                    self.console.close()
            # started by a test itself, or restarted: adopt the boot that runs
            self.console = util.Console(self.vm.path("console"))
            try:
                self.console.wait_ready(answer_first=True)
                return self.console
            except util.Timeout:
                pass
        if self.console:
            self.console.close()
            self.console = None
        self.vm.kill()
        self.console = self.vm.boot()
        return self.console

    def close(self):
        if self.console:
            self.console.close()


@pytest.fixture(scope="module")
def booted(module_mount_factory, guest_options):
    """Module-scoped: one mount and one VM `guest` booted to `capsafs-guest: ready`."""
    b = Booted(module_mount_factory(guest_options))
    b.ready()
    yield b
    b.close()


# ---- users -------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def as_root():
    if os.geteuid() != 0:
        pytest.skip("needs root, to act as a second user")


@pytest.fixture
def elapsed():
    """elapsed() -> seconds since the test started."""
    t0 = time.monotonic()
    return lambda: time.monotonic() - t0
