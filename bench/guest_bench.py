#!/usr/bin/env python3
"""Guest bench: bulk throughput and many connections through capsafs, against QEMU's own
channels, with a real guest under TCG.

One capsafs mount with one VM carries
  node    the vsock FUSE node        <mnt>/<vm>/vsock/<port>
  socket  the exported Unix socket   SOCKDIR/<vm>/<port>.sock
and a second, plain QEMU (same kernel, initrd, vCPUs, memory, machine and memory backend)
carries the comparison channels
  vserial virtio-serial: -chardev socket,server=on + virtserialport (/dev/vportNp1 in the guest)
  usernet QEMU user-mode networking, a hostfwd TCP port forward to the guest.

Every channel moves the same bytes both ways with the same guest program (socat -u with the
same -b), and every transfer is checksummed (SHA-256) end to end:
  guest->host  the guest sends a random /tmp/blob; the host times first byte to last byte.
  host->guest  the host sends random bytes, the guest writes them to /tmp/rx (tmpfs); the
               host times its first write to the guest's socat exiting (seen on the console).
Then `conns`: N concurrent connections through the connect-port socket to one guest
`socat VSOCK-LISTEN:...,fork PIPE` (an echo, one forked socat per connection), each sending a
unique payload and checking it comes back; daemon RSS before, at the peak and after.

Prints a table and writes a CSV.  AF_VSOCK is used only inside the guest; everything on the
host is FUSE files, Unix sockets and 127.0.0.1 TCP.

usage: bench/guest_bench.py [--builddir DIR] [--guest DIR] [--size MIB] [--bufsize BYTES]
                            [--cpus N] [--memory MIB] [--conns N] [--csv FILE]
                            [--channels node,socket,vserial,usernet] [--repeat N]
"""

import argparse
import csv
import hashlib
import os
import random
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(TOP, "tests"))
import util  # noqa: E402

CHANNELS = ("node", "socket", "vserial", "usernet")
LABEL = {"node": "capsafs vsock node (FUSE)", "socket": "capsafs exported socket",
         "vserial": "QEMU virtio-serial chardev", "usernet": "QEMU user-net TCP hostfwd"}
CHUNK = 1 << 20


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ---- the guest console, for both VMs ----------------------------------------------------

class SockConsole(util.Console):
    """util.Console over a connected Unix socket (the plain QEMU's serial port)."""

    def __init__(self, path, timeout=30):
        import codecs
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        s.setblocking(False)
        self.path = path
        self.fd = s.detach()
        self.data = ""
        self.pos = 0
        self._dec = codecs.getincrementaldecoder("utf-8")("replace")


def guest_async(con, command):
    """Start `command` in the guest's background; its exit status is printed on the console
    with a marker.  Returns a handle for guest_wait."""
    tag = uuid.uuid4().hex[:12]
    start = len(con.data)
    con.check(f'( ( ({command}) >/tmp/out-{tag} 2>&1 </dev/null; echo "@@D""{tag}" $? ) & )')
    return tag, start


def guest_wait(con, handle, timeout):
    """Wait for a guest_async command to end; return (status, its output)."""
    tag, start = handle
    rx = re.compile(rf"@@D{tag} (\d+)")
    deadline = time.monotonic() + timeout
    while True:
        m = rx.search(con.data, start)
        if m:
            break
        left = deadline - time.monotonic()
        if left <= 0:
            raise util.Timeout(f"guest command {tag} did not finish in {timeout} s; console:\n"
                               f"{con.tail()}")
        con.fill(min(left, 0.5))
    status = int(m.group(1))
    out = con.check(f"cat /tmp/out-{tag}; rm -f /tmp/out-{tag}")
    return status, out


# ---- one transfer ------------------------------------------------------------------------

class Result:
    def __init__(self, channel, direction, nbytes, seconds, ok, note=""):
        self.channel, self.direction = channel, direction
        self.nbytes, self.seconds, self.ok, self.note = nbytes, seconds, ok, note

    @property
    def mbps(self):
        return self.nbytes / self.seconds / 1e6 if self.ok and self.seconds > 0 else 0.0


def read_stream(read, want_bytes, timeout):
    """Read until EOF (or want_bytes when given); return (bytes, sha256, first-byte time,
    last-byte time)."""
    h = hashlib.sha256()
    n = 0
    t0 = None
    deadline = time.monotonic() + timeout
    while want_bytes is None or n < want_bytes:
        if time.monotonic() > deadline:
            raise util.Timeout(f"read: {n} bytes after {timeout} s")
        chunk = read(CHUNK if want_bytes is None else min(CHUNK, want_bytes - n))
        if not chunk:
            break
        if t0 is None:
            t0 = time.monotonic()
        h.update(chunk)
        n += len(chunk)
    return n, h.hexdigest(), t0, time.monotonic()


class Bench:
    def __init__(self, args):
        self.a = args
        self.size = args.size << 20
        self.b = args.bufsize
        self.results = []
        self.data = random.Random(20240601).randbytes(self.size)
        self.data_sum = hashlib.sha256(self.data).hexdigest()
        self.port = 1100

    def next_port(self):
        self.port += 1
        return self.port

    # ---- guest side helpers
    def make_blob(self, con):
        con.check(f"dd if=/dev/urandom of=/tmp/blob bs=1M count={self.a.size} 2>/dev/null",
                  timeout=600)
        return con.check("sha256sum /tmp/blob", timeout=600).split()[0]

    def rx_sum(self, con):
        out = con.check("sha256sum /tmp/rx; rm -f /tmp/rx", timeout=600)
        return out.split()[0]

    def record(self, channel, direction, n, seconds, ok, note=""):
        r = Result(channel, direction, n, seconds, ok, note)
        self.results.append(r)
        log(f"  {channel:8s} {direction}: {n} bytes in {seconds:.2f} s = {r.mbps:.1f} MB/s"
            + ("" if ok else f"  FAILED {note}"))
        return r

    # ---- guest -> host
    def g2h(self, channel, con, blob_sum, guest_cmd, host_open, want_bytes=None, pre=None):
        """host_open() -> (read function, close function), called after the guest command
        started (it may block until the guest connects)."""
        if pre:
            pre()
        job = guest_async(con, f"socat -u -b {self.b} FILE:/tmp/blob {guest_cmd}")
        note = ""
        try:
            read, close = host_open()
            try:
                n, s, t0, t1 = read_stream(read, want_bytes, self.a.timeout)
            finally:
                close()
            status, out = guest_wait(con, job, 120)
            ok = status == 0 and n == self.size and s == blob_sum
            if not ok:
                note = f"guest status {status} {out.strip()!r}, {n} bytes, sum ok: {s == blob_sum}"
            return self.record(channel, "g2h", n, (t1 - t0) if t0 else 0, ok, note)
        except (OSError, util.Timeout) as e:
            return self.record(channel, "g2h", 0, 0, False, repr(e)[:300])

    # ---- host -> guest
    def h2g(self, channel, con, guest_cmd, host_open, ready=None):
        """host_open() -> (write function, finish function); finish() ends the stream."""
        job = guest_async(con, f"socat -u -b {self.b} {guest_cmd} CREATE:/tmp/rx")
        try:
            if ready:
                ready()
            else:
                time.sleep(1.0)  # the guest's socat is up (same pause for every channel)
            write, finish = host_open()
            t0 = time.monotonic()
            view = memoryview(self.data)
            while view:
                n = write(view[:CHUNK])
                view = view[n:]
            finish()
            status, out = guest_wait(con, job, self.a.timeout)
            t1 = time.monotonic()
            s = self.rx_sum(con)
            ok = status == 0 and s == self.data_sum
            note = "" if ok else f"guest status {status} {out.strip()!r}, sum ok: {s == self.data_sum}"
            return self.record(channel, "h2g", self.size, t1 - t0, ok, note)
        except (OSError, util.Timeout, AssertionError) as e:
            con.run("rm -f /tmp/rx")
            return self.record(channel, "h2g", 0, 0, False, repr(e)[:300])


# ---- capsafs ------------------------------------------------------------------------------

def daemon_rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Capsafs:
    def __init__(self, a, workdir):
        self.a = a
        self.mnt = tempfile.mkdtemp(prefix="mnt-", dir=workdir)
        self.sockdir = tempfile.mkdtemp(prefix="gb-", dir="/tmp")
        exe = os.path.join(a.builddir, "src", "capsafs")
        opts = [f"sockdir={self.sockdir}", f"kernel={a.guest}/vmlinuz",
                f"initrd={a.guest}/initrd.img"]
        self.d = util.Daemon(exe, self.mnt, workdir, opts)
        self.vm = None
        self.con = None

    def start(self):
        self.d.start()
        util.fs(os.mkdir, os.path.join(self.mnt, "bench"))
        self.vm = util.VM(self.mnt, "bench")
        for attr, v in (("cpus", self.a.cpus), ("memory", self.a.memory)):
            e = self.vm.write(attr, f"{v}\n")
            assert e == 0, f"{attr}={v}: {util.errname(e)}: {self.vm.error()}"
        self.con = self.vm.boot()
        return self

    def declare(self, line):
        e = self.vm.write("vsock/ctl", line)
        assert e == 0, f"{line}: {util.errname(e)}: {self.vm.error()}"

    def sock(self, port):
        return os.path.join(self.sockdir, "bench", f"{port}.sock")

    def node(self, port):
        return self.vm.path("vsock", str(port))

    def stop(self):
        if self.con:
            self.con.close()
        problems = self.d.cleanup()
        shutil.rmtree(self.sockdir, ignore_errors=True)
        try:
            os.rmdir(self.mnt)
        except OSError:
            pass
        return problems


def unix_connect(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)  # blocking: waits for room in the listen backlog
    s.settimeout(60)
    return s


def bench_capsafs(bn, cf, chans):
    con = cf.con
    blob = bn.make_blob(con)
    for _ in range(bn.a.repeat):
        if "node" in chans:
            p = bn.next_port()
            cf.declare(f"listen {p}")

            def open_node_r(p=p):
                fd = util.fs(os.open, cf.node(p), os.O_RDONLY, timeout=60)
                return (lambda n: os.read(fd, n)), (lambda: os.close(fd))
            bn.g2h("node", con, blob, f"VSOCK-CONNECT:2:{p}", open_node_r)
            p = bn.next_port()
            cf.declare(f"listen {p}")

            def open_node_w(p=p):
                fd = util.fs(os.open, cf.node(p), os.O_WRONLY, timeout=60)
                return (lambda v: os.write(fd, v)), (lambda: os.close(fd))
            bn.h2g("node", con, f"VSOCK-CONNECT:2:{p}", open_node_w)
        if "socket" in chans:
            p = bn.next_port()
            cf.declare(f"listen {p}")
            box = {}

            def pre(p=p):
                box["s"] = unix_connect(cf.sock(p))

            def open_sock_r():
                s = box["s"]
                return s.recv, s.close
            bn.g2h("socket", con, blob, f"VSOCK-CONNECT:2:{p}", open_sock_r, pre=pre)
            p = bn.next_port()
            cf.declare(f"listen {p}")

            def open_sock_w(p=p):
                s = unix_connect(cf.sock(p))

                def finish():
                    s.shutdown(socket.SHUT_WR)
                    s.recv(1)  # EOF once the guest closed its side
                    s.close()
                return s.send, finish
            bn.h2g("socket", con, f"VSOCK-CONNECT:2:{p}", open_sock_w)
    con.check("rm -f /tmp/blob")


def bench_conns(bn, cf, n):
    """n concurrent connections through the connect-port socket to a forking guest echo."""
    con = cf.con
    port = 2100
    res = {"conns": n, "errors": 0}
    con.check(f"( socat VSOCK-LISTEN:{port},fork,backlog=1024 PIPE >/dev/null 2>&1 "
              "</dev/null & )")
    # wait for the listener: a node open succeeds once it accepts
    deadline = time.monotonic() + 60
    while True:
        try:
            fd = util.fs(os.open, cf.node(port), os.O_RDWR)
            os.close(fd)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)
    cf.declare(f"connect {port}")
    path = cf.sock(port)
    pid = cf.d.pid
    time.sleep(1)
    res["rss_before_kib"] = daemon_rss_kib(pid)
    peak = [res["rss_before_kib"]]
    stop = threading.Event()

    def sampler():
        while not stop.is_set():
            try:
                peak[0] = max(peak[0], daemon_rss_kib(pid))
            except OSError:
                pass
            stop.wait(0.05)
    th = threading.Thread(target=sampler, daemon=True)
    th.start()
    t0 = time.monotonic()
    sel = selectors.DefaultSelector()
    payloads, got, socks = {}, {}, {}
    errors = []
    try:
        for i in range(n):
            try:
                s = unix_connect(path)
            except OSError as e:
                errors.append(f"connect {i}: {e}")
                continue
            s.setblocking(False)
            r = random.Random(i)
            payloads[i] = f"conn-{i:05d}:".encode() + r.randbytes(2000) + b"\n"
            got[i] = bytearray()
            socks[i] = s
            sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE, [i, 0])
        t_connected = time.monotonic()
        open_ = set(socks)
        deadline = time.monotonic() + bn.a.timeout
        while open_ and time.monotonic() < deadline:
            for key, ev in sel.select(1.0):
                i, sent = key.data
                s = key.fileobj
                if ev & selectors.EVENT_WRITE and sent < len(payloads[i]):
                    try:
                        sent += s.send(payloads[i][sent:])
                    except BlockingIOError:
                        pass
                    except OSError as e:
                        errors.append(f"send {i}: {e}")
                        sel.unregister(s)
                        open_.discard(i)
                        continue
                    key.data[1] = sent
                    if sent == len(payloads[i]):
                        sel.modify(s, selectors.EVENT_READ, key.data)
                if ev & selectors.EVENT_READ:
                    try:
                        chunk = s.recv(65536)
                    except BlockingIOError:
                        continue
                    except OSError as e:
                        errors.append(f"recv {i}: {e}")
                        sel.unregister(s)
                        open_.discard(i)
                        continue
                    if not chunk:
                        errors.append(f"conn {i}: EOF after {len(got[i])} bytes")
                        sel.unregister(s)
                        open_.discard(i)
                        continue
                    got[i] += chunk
                    if len(got[i]) >= len(payloads[i]):
                        if bytes(got[i]) != payloads[i]:
                            errors.append(f"conn {i}: payload mismatch")
                        sel.unregister(s)
                        open_.discard(i)
        for i in open_:
            errors.append(f"conn {i}: timed out with {len(got[i])} bytes")
        t_done = time.monotonic()
        res["rss_peak_kib"] = max(peak[0], daemon_rss_kib(pid))
    finally:
        for s in socks.values():
            s.close()
        sel.close()
    # let the closes finish (SHUTDOWN / RST round trips) before the after figure
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = [ln for ln in cf.vm.read("vsock/ports").splitlines()
                if ln.startswith(f"{port} ")]
        if line and line[0].split()[3] == "0":
            break
        time.sleep(0.5)
    time.sleep(1)
    stop.set()
    th.join()
    res["rss_after_kib"] = daemon_rss_kib(pid)
    res["rss_peak_kib"] = max(res["rss_peak_kib"], peak[0])
    res["errors"] = len(errors)
    res["connect_s"] = t_connected - t0
    res["total_s"] = t_done - t0
    res["error_samples"] = errors[:5]
    con.check(f"kill $(pidof socat) 2>/dev/null; true")
    return res


# ---- the plain QEMU -----------------------------------------------------------------------

class PlainQemu:
    def __init__(self, a, workdir):
        self.a = a
        self.dir = tempfile.mkdtemp(prefix="gbq-", dir="/tmp")
        self.serial = os.path.join(self.dir, "serial.sock")
        self.vport = os.path.join(self.dir, "vport.sock")
        self.p = None
        self.con = None
        self.fwd_h2g = self.fwd_g2h = None

    @staticmethod
    def free_port():
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        p = s.getsockname()[1]
        s.close()
        return p

    def start(self):
        a = self.a
        self.fwd_h2g, self.fwd_g2h = self.free_port(), self.free_port()
        # the machine capsafs gives its VMs (qemu.c), plus the comparison devices
        args = ["qemu-system-x86_64", "-name", "guest-bench", "-nodefaults", "-no-user-config",
                "-display", "none", "-no-reboot",
                "-machine", "q35,accel=tcg,memory-backend=mem",
                "-object", f"memory-backend-memfd,id=mem,size={a.memory}M,share=on",
                "-m", f"{a.memory}M", "-smp", str(a.cpus),
                "-kernel", os.path.join(a.guest, "vmlinuz"),
                "-initrd", os.path.join(a.guest, "initrd.img"),
                "-append", "console=ttyS0",
                "-chardev", f"socket,id=con,path={self.serial},server=on,wait=on",
                "-serial", "chardev:con",
                "-device", "virtio-serial-pci",
                "-chardev", f"socket,id=vp,path={self.vport},server=on,wait=off",
                "-device", "virtserialport,chardev=vp,name=bench",
                "-netdev", f"user,id=n,hostfwd=tcp:127.0.0.1:{self.fwd_h2g}-:5555,"
                           f"hostfwd=tcp:127.0.0.1:{self.fwd_g2h}-:5556",
                "-device", "virtio-net-pci,netdev=n"]
        self.err = open(os.path.join(self.dir, "qemu.err"), "w")
        self.p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self.err,
                                  stderr=self.err)
        self.con = SockConsole(self.serial)
        self.con.wait_ready(util.BOOT_TIMEOUT)
        self.con.check("ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0")
        self.dev = self.con.check("ls /dev/vport*p1").split()[0]
        return self

    def stop(self):
        if self.con:
            self.con.close()
        if self.p and self.p.poll() is None:
            self.p.kill()
            self.p.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def tcp_connect(port, timeout=30):
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return s


def bench_qemu(bn, q, chans):
    con = q.con
    blob = bn.make_blob(con)
    vp = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    vp.connect(q.vport)
    vp.settimeout(bn.a.timeout)
    try:
        for _ in range(bn.a.repeat):
            if "vserial" in chans:
                # virtio-serial passes no EOF: both ends count the bytes
                bn.g2h("vserial", con, blob, f"OPEN:{q.dev}", lambda: (vp.recv, lambda: None),
                       want_bytes=bn.size)
                bn.h2g("vserial", con, f"OPEN:{q.dev},readbytes={bn.size}",
                       lambda: (vp.send, lambda: None))
            if "usernet" in chans:
                def open_tcp_r():
                    # slirp accepts at once and drops us if the guest is not listening yet
                    deadline = time.monotonic() + 30
                    while True:
                        s = tcp_connect(q.fwd_g2h)
                        s.settimeout(bn.a.timeout)
                        first = s.recv(CHUNK)
                        if first:
                            break
                        s.close()
                        if time.monotonic() > deadline:
                            raise util.Timeout("guest TCP listener never answered")
                        time.sleep(0.2)
                    box = [first]

                    def read(n):
                        if box:
                            return box.pop()
                        return s.recv(n)
                    return read, s.close
                bn.g2h("usernet", con, blob, "TCP-LISTEN:5556,reuseaddr", open_tcp_r)

                def listening():
                    util.wait_for(lambda: con.run("netstat -ltn | grep -q ':5555 '")[0] == 0,
                                  30, "guest TCP listener")

                def open_tcp_w():
                    s = tcp_connect(q.fwd_h2g)
                    s.settimeout(bn.a.timeout)

                    def finish():
                        s.shutdown(socket.SHUT_WR)
                        s.recv(1)
                        s.close()
                    return s.send, finish
                bn.h2g("usernet", con, "TCP-LISTEN:5555,reuseaddr", open_tcp_w,
                       ready=lambda: (listening(), time.sleep(1.0)))
    finally:
        vp.close()
    con.check("rm -f /tmp/blob")


# ---- report -------------------------------------------------------------------------------

def report(bn, conns, a):
    best = {}
    for r in bn.results:
        k = (r.channel, r.direction)
        best.setdefault(k, []).append(r)
    rows = []
    print()
    print(f"guest bench: {a.size} MiB per transfer, socat -b {a.bufsize}, {a.cpus} vCPU, "
          f"{a.memory} MiB, TCG; MB/s = 10^6 bytes/s (median of {a.repeat})")
    print(f"{'channel':30s} {'guest->host':>12s} {'host->guest':>12s}")
    med = {}
    for ch in CHANNELS:
        cells = []
        for d in ("g2h", "h2g"):
            rs = best.get((ch, d))
            if not rs:
                cells.append("-")
                continue
            if not all(r.ok for r in rs):
                cells.append("FAILED")
                med[(ch, d)] = None
            else:
                v = sorted(r.mbps for r in rs)[len(rs) // 2]
                med[(ch, d)] = v
                cells.append(f"{v:.1f}")
            for r in rs:
                rows.append([ch, d, r.nbytes, f"{r.seconds:.3f}", f"{r.mbps:.2f}",
                             "ok" if r.ok else "FAILED", r.note])
        if any(c != "-" for c in cells):
            print(f"{LABEL[ch]:30s} {cells[0]:>12s} {cells[1]:>12s}")
    pct = []
    for d in ("g2h", "h2g"):
        n, s = med.get(("node", d)), med.get(("socket", d))
        pct.append(f"{100 * n / s:.0f}%" if n and s else "-")
    print(f"{'node as % of socket':30s} {pct[0]:>12s} {pct[1]:>12s}")
    if conns:
        print(f"\n{conns['conns']} concurrent connections through the connect-port socket: "
              f"{conns['errors']} errors, connected in {conns['connect_s']:.1f} s, "
              f"all echoed in {conns['total_s']:.1f} s")
        print(f"capsafs RSS: before {conns['rss_before_kib']} KiB, peak "
              f"{conns['rss_peak_kib']} KiB, after {conns['rss_after_kib']} KiB")
        for e in conns["error_samples"]:
            print("  error:", e)
        rows.append(["conns", "echo", conns["conns"], f"{conns['total_s']:.3f}", "",
                     "ok" if conns["errors"] == 0 else "FAILED",
                     f"errors={conns['errors']} rss_before_kib={conns['rss_before_kib']} "
                     f"rss_peak_kib={conns['rss_peak_kib']} "
                     f"rss_after_kib={conns['rss_after_kib']}"])
    if a.csv:
        with open(a.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["channel", "direction", "bytes", "seconds", "MBps", "status", "note"])
            w.writerows(rows)
        print(f"\nwrote {a.csv}")
    failed = [r for r in bn.results if not r.ok] or (conns and conns["errors"])
    return 1 if failed else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--builddir", default=TOP)
    ap.add_argument("--guest", default=None, help="dir with vmlinuz and initrd.img")
    ap.add_argument("--size", type=int, default=128,
                    help="MiB per transfer (default 128; at most 255)")
    ap.add_argument("--bufsize", type=int, default=65536, help="socat -b in the guest")
    ap.add_argument("--cpus", type=int, default=1)
    ap.add_argument("--memory", type=int, default=1024, help="MiB for both VMs")
    ap.add_argument("--conns", type=int, default=1000, help="0 skips the connection test")
    ap.add_argument("--repeat", type=int, default=3,
                    help="transfers per channel and direction; the median is shown (default 3)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per transfer")
    ap.add_argument("--channels", default=",".join(CHANNELS))
    ap.add_argument("--csv", default=os.path.join(HERE, "results-guest.csv"))
    ap.add_argument("--hold", action="store_true",
                    help="print the pids and wait for Enter before the transfers (for perf)")
    a = ap.parse_args()
    if not 1 <= a.size <= 255:
        ap.error("--size must be 1..255 MiB (the random blob is made in one piece)")
    a.builddir = os.path.abspath(a.builddir)
    a.guest = os.path.abspath(a.guest or os.path.join(a.builddir, "guest"))
    chans = [c for c in a.channels.split(",") if c]
    bad = [c for c in chans if c not in CHANNELS]
    if bad:
        ap.error(f"unknown channel(s) {bad}; pick from {CHANNELS}")
    for f in ("vmlinuz", "initrd.img"):
        if not os.path.isfile(os.path.join(a.guest, f)):
            sys.exit(f"guest_bench: no {f} in {a.guest} (make guest)")
    if not os.access(os.path.join(a.builddir, "src", "capsafs"), os.X_OK):
        sys.exit(f"guest_bench: no capsafs in {a.builddir}/src (make)")

    workdir = tempfile.mkdtemp(prefix="guest-bench-")
    bn = Bench(a)
    cf = q = None
    conns = None
    rc = 1

    def on_signal(sig, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_signal)
    try:
        need_capsafs = any(c in chans for c in ("node", "socket")) or a.conns
        need_qemu = any(c in chans for c in ("vserial", "usernet"))
        if need_capsafs:
            log("booting the capsafs VM ...")
            cf = Capsafs(a, workdir).start()
        if need_qemu:
            log("booting the plain QEMU VM ...")
            q = PlainQemu(a, workdir).start()
        if a.hold:
            print(f"capsafs pid {cf.d.pid if cf else '-'}, capsafs QEMU "
                  f"{util.children_of(cf.d.pid) if cf else '-'}, plain QEMU "
                  f"{q.p.pid if q else '-'}; Enter to go on", flush=True)
            sys.stdin.readline()
        if cf and any(c in chans for c in ("node", "socket")):
            log("capsafs channels ...")
            bench_capsafs(bn, cf, chans)
        if q:
            log("QEMU channels ...")
            bench_qemu(bn, q, chans)
        if cf and a.conns:
            log(f"{a.conns} concurrent connections ...")
            conns = bench_conns(bn, cf, a.conns)
        rc = report(bn, conns, a)
    finally:
        if q:
            q.stop()
        if cf:
            for p in cf.stop():
                log("cleanup:", p)
        shutil.rmtree(workdir, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
