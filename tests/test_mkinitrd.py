"""capsafs-mkinitrd: what goes into the image, in which order, its errors, and one boot.

Needs no FUSE: the program runs against the module tree capsafs-guest leaves in
$CAPSAFS_GUEST/modroot, and the boot test runs QEMU (TCG) on $CAPSAFS_GUEST's vmlinuz and
initrd.img with the serial console on a pipe.
"""

import gzip
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import time
import uuid

import pytest

import util

# the transports and devices capsafs gives a guest, and the ACPI power button its stop uses
DEFAULT_MODULES = ["virtio_pci", "virtio_console", "virtio_net", "vmw_vsock_virtio_transport",
                   "button", "evdev"]
VSOCK_MODULES = ["vsock", "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport"]
RUN_TIMEOUT = 120  # one capsafs-mkinitrd run
# one step on a booted guest's console; a loaded 2-core TCG host (the sanitizer pass runs
# next to other work) has taken over 60 s for one, so each wait is for the line itself
STEP_TIMEOUT = 120


# ---- fixtures ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mkinitrd():
    d = os.environ.get("CAPSAFS_BUILDDIR") or os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))
    exe = os.path.join(d, "src", "capsafs-mkinitrd")
    if not os.access(exe, os.X_OK):
        pytest.fail(f"no capsafs-mkinitrd at {exe}: make src/capsafs-mkinitrd, or set "
                    "CAPSAFS_BUILDDIR")
    return exe


@pytest.fixture(scope="module")
def guest_dir():
    d = os.environ.get("CAPSAFS_GUEST") or os.path.join(
        os.environ.get("CAPSAFS_BUILDDIR") or os.path.dirname(os.path.dirname(
            os.path.abspath(__file__))), "guest")
    return os.path.abspath(d)


class Tree:
    """The kernel module tree of the test guest."""

    def __init__(self, guest_dir):
        vfile = os.path.join(guest_dir, "VERSION")
        if not os.path.isfile(vfile):
            pytest.fail(f"{vfile} missing: build the guest (make guest, or "
                        f"contrib/capsafs-guest --out {guest_dir})")
        self.version = open(vfile).read().strip()
        self.root = os.path.join(guest_dir, "modroot")
        self.dir = os.path.join(self.root, "lib", "modules", self.version)
        if not os.path.isfile(os.path.join(self.dir, "modules.dep")):
            pytest.fail(f"no modules.dep in {self.dir}: rebuild the guest with "
                        "contrib/capsafs-guest --force")
        self.dep = parse_modules_dep(os.path.join(self.dir, "modules.dep"))

    def path_of(self, name):
        """The modules.dep path of module `name` (- and _ are the same)."""
        want = name.replace("-", "_")
        for p in self.dep:
            if modname(p) == want:
                return p
        raise KeyError(name)


@pytest.fixture(scope="module")
def tree(guest_dir):
    return Tree(guest_dir)


def parse_modules_dep(path):
    """{module path: [paths it depends on]} as depmod wrote them."""
    dep = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            mod, _, deps = line.partition(":")
            dep[mod] = deps.split()
    return dep


def modname(path):
    """kernel/net/vmw_vsock/vsock.ko.xz -> vsock"""
    base = os.path.basename(path)
    return base[:base.index(".ko")].replace("-", "_")


def strip_compression(path):
    return re.sub(r"\.ko\..*$", ".ko", path)


def run_mkinitrd(exe, *args, env=None, cwd=None):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=RUN_TIMEOUT,
                          env=e, cwd=cwd)


def read_newc(path):
    """Parse a gzip'd newc cpio archive independently of the program: a list of entries
    (name, mode, data, (rdevmajor, rdevminor)) in archive order, up to the trailer."""
    raw = gzip.open(path).read()
    entries, off = [], 0
    while True:
        hdr = raw[off:off + 110]
        assert hdr[:6] == b"070701", f"bad newc magic at {off}: {hdr[:6]!r}"
        f = [int(hdr[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        mode, filesize, rmaj, rmin, namesize = f[1], f[6], f[9], f[10], f[11]
        name = raw[off + 110:off + 110 + namesize - 1].decode()
        assert raw[off + 110 + namesize - 1] == 0, "name not NUL-terminated"
        off = (off + 110 + namesize + 3) & ~3
        data = raw[off:off + filesize]
        off = (off + filesize + 3) & ~3
        if name == "TRAILER!!!":
            return entries
        entries.append((name, mode, data, (rmaj, rmin)))


class Image:
    def __init__(self, path, proc):
        self.path = path
        self.proc = proc
        self.entries = read_newc(path)
        self.by_name = {e[0]: e for e in self.entries}

    def mode(self, name):
        return self.by_name[name][1]

    def data(self, name):
        return self.by_name[name][2]

    def load_order(self):
        return [l for l in self.data("etc/capsafs-modules").decode().splitlines() if l]


@pytest.fixture(scope="module")
def image(mkinitrd, tree, tmp_path_factory):
    """The default image for the test guest's kernel, built once for the module."""
    out = str(tmp_path_factory.mktemp("img") / "initrd.img")
    p = run_mkinitrd(mkinitrd, "-b", tree.root, "-k", tree.version, "-o", out)
    assert p.returncode == 0, f"capsafs-mkinitrd failed:\n{p.stdout}\n{p.stderr}"
    assert p.stderr == "", f"unexpected stderr:\n{p.stderr}"
    return Image(out, p)


# ---- what is in the image ----------------------------------------------------------------

def test_image_has_init_busybox_socat_and_device_nodes(image):
    init = image.data("init")
    assert stat.S_ISREG(image.mode("init")) and image.mode("init") & 0o111
    assert init.startswith(b"#!/bin/sh\n")
    assert b"capsafs-guest: ready" in init
    assert stat.S_ISREG(image.mode("bin/busybox"))
    for applet in ("sh", "mount", "insmod", "poweroff", "setsid", "cttyhack", "ip", "cat"):
        name = f"bin/{applet}"
        assert stat.S_ISLNK(image.mode(name)), name
        assert image.data(name) == b"busybox"
    assert stat.S_ISREG(image.mode("usr/bin/socat")) and image.mode("usr/bin/socat") & 0o111
    assert stat.S_ISCHR(image.mode("dev/console"))
    assert image.by_name["dev/console"][3] == (5, 1)
    assert image.by_name["dev/null"][3] == (1, 3)
    for d in ("proc", "sys", "tmp", "dev", "etc", "root"):
        assert stat.S_ISDIR(image.mode(d)), d
    assert image.mode("tmp") & 0o1777 == 0o1777


def test_image_has_socat_libraries_and_loader(image):
    ldd = subprocess.run(["ldd", shutil.which("socat")], capture_output=True, text=True,
                         check=True).stdout
    paths = re.findall(r"(?:=> |^\s*)(/\S+) \(", ldd, re.M)
    assert any("ld-linux" in p for p in paths), ldd
    for p in paths:
        name = p.lstrip("/")
        assert name in image.by_name, f"{p} missing from the image"
        with open(p, "rb") as f:
            assert image.data(name) == f.read(), f"{p} differs from the host's"


def test_directories_come_before_their_entries(image):
    """The kernel's initramfs unpacker does not create missing parents."""
    seen = set()
    for name, mode, _, _ in image.entries:
        parent = os.path.dirname(name)
        assert not parent or parent in seen, f"{name} comes before its directory {parent}"
        assert name not in seen, f"{name} twice"
        seen.add(name)


def test_image_has_the_vsock_and_virtio_modules(image, tree):
    order = image.load_order()
    names = [modname(p) for p in order]
    for m in DEFAULT_MODULES + VSOCK_MODULES + ["virtio", "virtio_ring"]:
        assert m in names, f"{m} not in the load order {names}"
    for p in order:
        assert p.startswith(f"/lib/modules/{tree.version}/") and p.endswith(".ko"), p
        host = os.path.join(tree.dir, os.path.relpath(p, f"/lib/modules/{tree.version}"))
        with open(host, "rb") as f:
            assert image.data(p.lstrip("/")) == f.read(), f"{p} differs from {host}"
    # The summary names every module, in load order.
    printed = re.findall(r"^  module +(\S+)", image.proc.stdout, re.M)
    assert printed == names


def assert_order_respects_modules_dep(tree, order):
    """Every module of the load order comes after all modules.dep says it needs; returns
    the order as modules.dep paths."""
    rel = [os.path.relpath(p, f"/lib/modules/{tree.version}") for p in order]
    by_guest_path = {strip_compression(p): p for p in tree.dep}
    assert len(set(rel)) == len(rel), f"a module twice: {rel}"
    for i, r in enumerate(rel):
        for dep in tree.dep[by_guest_path[r]]:
            d = strip_compression(dep)
            assert d in rel, f"{r} needs {d}, which is not in the image"
            assert rel.index(d) < i, f"{r} is loaded before its dependency {d}"
    return {by_guest_path[r] for r in rel}


def test_load_order_respects_modules_dep(image, tree):
    included = assert_order_respects_modules_dep(tree, image.load_order())
    # Nothing more than the closure of what was asked for.
    want = set()
    for m in DEFAULT_MODULES:
        p = tree.path_of(m)
        want |= {p, *tree.dep[p]}
    assert included == want


def test_guest_modules_dep_lists_the_image_subset(image, tree):
    dep = image.data(f"lib/modules/{tree.version}/modules.dep").decode()
    lines = dict(l.split(":", 1) for l in dep.splitlines())
    rel = [os.path.relpath(p, f"/lib/modules/{tree.version}") for p in image.load_order()]
    assert sorted(lines) == sorted(rel)
    vsock = "kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko"
    assert "kernel/net/vmw_vsock/vsock.ko" in lines[vsock].split()


def test_same_inputs_give_the_same_image(mkinitrd, tree, image, tmp_path):
    out = str(tmp_path / "again.img")
    p = run_mkinitrd(mkinitrd, "-b", tree.root, "-k", tree.version, "-o", out)
    assert p.returncode == 0, p.stderr
    with open(out, "rb") as a, open(image.path, "rb") as b:
        assert a.read() == b.read()


def test_extra_module_by_alias_and_builtin_module_relative_root(mkinitrd, tree, tmp_path):
    with open(os.path.join(tree.dir, "modules.builtin")) as f:
        builtin = modname(f.readline().strip())
    out = str(tmp_path / "extra.img")
    p = run_mkinitrd(mkinitrd, "-b", os.path.basename(tree.root), "-k", tree.version,
                     "-o", out, "-m", "fs-9p", "-m", "9pnet-virtio", "-m", builtin,
                     cwd=os.path.dirname(tree.root))
    assert p.returncode == 0, p.stderr
    assert re.search(rf"^  builtin +{re.escape(builtin)}$", p.stdout, re.M), p.stdout
    order = Image(out, p).load_order()
    names = [modname(x) for x in order]
    for m in ("9p", "9pnet", "9pnet_virtio", "netfs"):
        assert m in names
    assert builtin not in names
    assert_order_respects_modules_dep(tree, order)


# ---- errors ------------------------------------------------------------------------------

def assert_one_line_error(p, *words):
    assert p.returncode == 1, f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, f"want one error line, got:\n{p.stderr}"
    assert lines[0].startswith("capsafs-mkinitrd: error: "), lines[0]
    for w in words:
        assert w in lines[0], f"{w!r} not in {lines[0]!r}"


def assert_no_output(d):
    assert os.listdir(d) == [], f"left behind: {os.listdir(d)}"


def test_unknown_module_fails_clearly(mkinitrd, tree, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    p = run_mkinitrd(mkinitrd, "-b", tree.root, "-k", tree.version,
                     "-o", str(out / "initrd.img"), "-m", "no_such_module_xyz")
    assert_one_line_error(p, "unknown module no_such_module_xyz")
    assert_no_output(out)


def test_missing_module_tree_fails(mkinitrd, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    p = run_mkinitrd(mkinitrd, "-b", str(tmp_path / "nowhere"), "-k", "6.1.0-99-amd64",
                     "-o", str(out / "initrd.img"))
    assert_one_line_error(p, "no module tree", str(tmp_path / "nowhere"))
    assert_no_output(out)


def test_module_tree_without_modules_dep_names_depmod(mkinitrd, tmp_path):
    (tmp_path / "root/lib/modules/6.1.0-99-amd64/kernel").mkdir(parents=True)
    p = run_mkinitrd(mkinitrd, "-b", str(tmp_path / "root"), "-k", "6.1.0-99-amd64",
                     "-o", str(tmp_path / "initrd.img"))
    assert_one_line_error(p, "modules.dep", "depmod -b")


@pytest.mark.parametrize("busybox, words", [
    ("/nonexistent/busybox", ["busybox not found at /nonexistent/busybox"]),
    ("NOTEXEC", ["is not an executable"]),
    ("SOCAT", ["dynamically linked", "busybox-static"]),
])
def test_unusable_busybox_fails(mkinitrd, tree, tmp_path, busybox, words):
    if busybox == "SOCAT":
        busybox = shutil.which("socat")
    elif busybox == "NOTEXEC":
        busybox = str(tmp_path / "busybox")
        open(busybox, "w").close()
    out = tmp_path / "out"
    out.mkdir()
    p = run_mkinitrd(mkinitrd, "-b", tree.root, "-k", tree.version,
                     "-o", str(out / "initrd.img"), env={"CAPSAFS_BUSYBOX": busybox})
    assert_one_line_error(p, *words)
    assert_no_output(out)


def test_bad_usage_exits_2(mkinitrd):
    assert run_mkinitrd(mkinitrd, "-Z").returncode == 2
    assert run_mkinitrd(mkinitrd, "stray").returncode == 2


def test_compressed_modules_are_unpacked(mkinitrd, tree, tmp_path):
    """A tree of .ko.xz/.ko.zst modules (other distributions') gives plain .ko files in the
    image, since busybox insmod cannot read compressed ones."""
    tools = {"xz": shutil.which("xz"), "zstd": shutil.which("zstd")}
    depmod = shutil.which("depmod") or shutil.which("depmod", path="/usr/sbin:/sbin")
    missing = [t for t, p in {**tools, "depmod": depmod}.items() if not p]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (apt-get install xz-utils zstd kmod)")
    # A small tree: the default modules' closure, two of them compressed.
    root = tmp_path / "root"
    mdir = root / "lib/modules" / tree.version
    want = set()
    for m in DEFAULT_MODULES:
        p = tree.path_of(m)
        want |= {p, *tree.dep[p]}
    for p in want:
        (mdir / p).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.join(tree.dir, p), mdir / p)
    for f in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
        if os.path.exists(os.path.join(tree.dir, f)):
            shutil.copy(os.path.join(tree.dir, f), mdir / f)
    xz = "kernel/net/vmw_vsock/vsock.ko"
    zst = "kernel/drivers/virtio/virtio_ring.ko"
    subprocess.run([tools["xz"], "-q", str(mdir / xz)], check=True)
    subprocess.run([tools["zstd"], "-q", "--rm", str(mdir / zst)], check=True)
    subprocess.run([depmod, "-b", str(root), tree.version], check=True)
    assert f"{xz}.xz" in parse_modules_dep(mdir / "modules.dep")

    out = str(tmp_path / "initrd.img")
    p = run_mkinitrd(mkinitrd, "-b", str(root), "-k", tree.version, "-o", out)
    assert p.returncode == 0, p.stderr
    img = Image(out, p)
    for rel in (xz, zst):
        with open(os.path.join(tree.dir, rel), "rb") as f:
            assert img.data(f"lib/modules/{tree.version}/{rel}") == f.read(), rel
    assert f"/lib/modules/{tree.version}/{xz}" in img.load_order()


# ---- boot --------------------------------------------------------------------------------

class Serial:
    """QEMU's serial console on its stdin/stdout pipes."""

    def __init__(self, proc):
        self.proc = proc
        self.data = ""
        self.pos = 0

    def fill(self, timeout):
        fd = self.proc.stdout.fileno()
        r, _, _ = select.select([fd], [], [], timeout)
        if r:
            chunk = os.read(fd, 65536)
            if not chunk:
                raise util.Timeout(f"QEMU closed the console (exit {self.proc.wait(5)}); "
                                   f"last output:\n{self.data[-3000:]}")
            self.data += chunk.decode("utf-8", "replace").replace("\r", "")

    def expect(self, pattern, timeout):
        rx = re.compile(pattern, re.M | re.S)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.data, self.pos)
            if m:
                self.pos = m.end()
                return m
            left = deadline - time.monotonic()
            if left <= 0:
                raise util.Timeout(f"no {pattern!r} on the console within {timeout} s; last "
                                   f"output:\n{self.data[-3000:]}")
            self.fill(min(left, 1.0))

    def send(self, text):
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def run(self, command, timeout=STEP_TIMEOUT):
        """Run a shell command; its output between markers the typed line cannot match."""
        tag = uuid.uuid4().hex[:12]
        self.send(f'echo "@@B""{tag}"; {command}; echo "@@E""{tag}" $?\n')
        m = self.expect(rf"^@@B{tag}\n(.*?)^@@E{tag} (\d+)$", timeout)
        return int(m.group(2)), m.group(1)


def test_guest_boots_runs_capsafs_run_answers_and_powers_off(guest_dir, tree):
    qemu = shutil.which("qemu-system-x86_64")
    if not qemu:
        pytest.fail("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    for f in ("vmlinuz", "initrd.img"):
        if not os.path.isfile(os.path.join(guest_dir, f)):
            pytest.fail(f"{guest_dir}/{f} missing: build the guest (make guest)")
    # The quoted form, with a percent escape the init must decode.
    cmdline = 'console=ttyS0 capsafs.run="echo hello-from-run; echo 100%25 decoded"'
    proc = subprocess.Popen(
        [qemu, "-accel", "tcg", "-m", "512", "-nodefaults", "-no-user-config",
         "-display", "none", "-no-reboot", "-serial", "stdio",
         "-kernel", os.path.join(guest_dir, "vmlinuz"),
         "-initrd", os.path.join(guest_dir, "initrd.img"), "-append", cmdline],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        con = Serial(proc)
        start = time.monotonic()
        con.expect(r"^capsafs-guest: ready$", util.BOOT_TIMEOUT)
        ready_after = time.monotonic() - start
        assert "capsafs-guest: insmod" not in con.data, "a module failed to load:\n" + con.data
        con.expect(r"^hello-from-run$", STEP_TIMEOUT)
        con.expect(r"^100% decoded$", STEP_TIMEOUT)
        con.expect(r"^capsafs-guest: run exited with status 0$", STEP_TIMEOUT)
        con.expect(r"built-in shell", STEP_TIMEOUT)
        con.expect(r"# ", STEP_TIMEOUT)

        status, out = con.run("echo shell-$((6 * 7))")
        assert (status, out) == (0, "shell-42\n")
        status, out = con.run("ls /sys/bus/virtio/drivers")
        assert status == 0
        for drv in ("virtio_console", "virtio_net", "vmw_vsock_virtio_transport"):
            assert drv in out.split(), out
        status, out = con.run("cut -d' ' -f1 /proc/modules")
        assert status == 0 and set(VSOCK_MODULES + ["virtio_pci"]) <= set(out.split()), out
        status, out = con.run("socat -V")
        assert status == 0 and "socat version" in out, out

        con.send("poweroff -f\n")
        rc = proc.wait(STEP_TIMEOUT)
        assert rc == 0, f"QEMU exited {rc}; console:\n{con.data[-3000:]}"
        print(f"ready {ready_after:.1f} s after QEMU started")
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
