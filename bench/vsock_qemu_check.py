#!/usr/bin/env python3
"""Manual end-to-end check of the vhost-user vsock device against a real QEMU.

Starts tests/vsock_echo_host on a vhost-user socket, boots QEMU (TCG) with
vhost-user-vsock-pci against it, and drives the guest's serial console:
guest->host echo and bulk transfers, host->guest connects, checksums, then a
QEMU restart on the same device (reconnect).  Only the guest uses vsock sockets;
this side speaks vhost-user and Unix sockets.

usage: bench/vsock_qemu_check.py [BUILDDIR] [GUESTDIR]
"""
import hashlib, os, socket, subprocess, sys, tempfile, threading, time

BUILD = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else ".")
GUEST = os.path.abspath(sys.argv[2] if len(sys.argv) > 2 else os.path.join(BUILD, "guest"))
CID = 7
tmp = tempfile.mkdtemp(prefix="vsock-qemu-")
VU = os.path.join(tmp, "vu.sock")
SERIAL = os.path.join(tmp, "serial.sock")
results = []


def log(*a):
    print(*a, flush=True)


def check(name, ok, detail=""):
    results.append((name, ok))
    log(("PASS " if ok else "FAIL ") + name + (": " + detail if detail else ""))


class Host:
    def __init__(self):
        env = dict(os.environ, VSOCK_SRC=os.path.join(tmp, "src.bin"))
        self.p = subprocess.Popen([os.path.join(BUILD, "tests/vsock_echo_host"), VU, str(CID)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=open(os.path.join(tmp, "host.err"), "w"),
                                  text=True, env=env, bufsize=1)
        self.lines = []
        os.set_blocking(self.p.stdout.fileno(), False)

    def poll(self):
        while True:
            try:
                l = self.p.stdout.readline()
            except (BlockingIOError, TypeError):
                break
            if not l:
                break
            self.lines.append(l.rstrip())
            log("  host:", l.rstrip())

    def cmd(self, s):
        self.p.stdin.write(s + "\n")
        self.p.stdin.flush()

    def wait(self, pred, timeout):
        end = time.time() + timeout
        while time.time() < end:
            self.poll()
            for l in self.lines:
                if pred(l):
                    return l
            time.sleep(0.05)
        return None


class Qemu:
    def __init__(self):
        # no `timeout` wrapper: we need QEMU's own pid to kill it; a watchdog
        # thread kills it after 600 s instead
        args = ["qemu-system-x86_64", "-accel", "tcg",
                "-machine", "q35,memory-backend=mem",
                "-object", "memory-backend-memfd,id=mem,size=512M,share=on", "-m", "512",
                "-nodefaults", "-display", "none", "-no-reboot",
                "-serial", "unix:%s,server=on,wait=on" % SERIAL,
                "-chardev", "socket,id=vs,path=%s" % VU,
                "-device", "vhost-user-vsock-pci,chardev=vs",
                "-kernel", os.path.join(GUEST, "vmlinuz"),
                "-initrd", os.path.join(GUEST, "initrd.img"),
                "-append", "console=ttyS0 quiet"]
        if os.path.exists(SERIAL):
            os.unlink(SERIAL)
        self.p = subprocess.Popen(args, stdout=open(os.path.join(tmp, "qemu.out"), "a"),
                                  stderr=subprocess.STDOUT)
        self.watchdog = threading.Timer(600, self.p.kill)
        self.watchdog.daemon = True
        self.watchdog.start()
        for _ in range(100):
            if os.path.exists(SERIAL):
                break
            time.sleep(0.1)
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(SERIAL)
        self.s.settimeout(0.2)
        self.buf = b""

    def read_until(self, marker, timeout):
        end = time.time() + timeout
        while time.time() < end:
            if marker in self.buf:
                i = self.buf.index(marker) + len(marker)
                out, self.buf = self.buf[:i], self.buf[i:]
                return out.decode(errors="replace")
            try:
                d = self.s.recv(65536)
                if not d:
                    break
                self.buf += d
            except socket.timeout:
                pass
        raise TimeoutError("waiting for %r; have %r" % (marker, self.buf[-500:]))

    def sh(self, cmd, timeout=120):
        n = int(time.time() * 1000) % 1000000
        # quoted so the tty echo of the command line never matches the marker
        self.s.sendall(('%s; echo "M""K%d:$?"\n' % (cmd, n)).encode())
        out = self.read_until(("MK%d:" % n).encode(), timeout)
        rest = self.read_until(b"\n", 10)
        try:
            status = int(rest.strip())
        except ValueError:
            status = -1
        return out, status

    def kill(self):
        self.p.kill()
        self.p.wait()
        self.watchdog.cancel()


def md5(path):
    return hashlib.md5(open(path, "rb").read()).hexdigest()


def boot():
    q = Qemu()
    q.read_until(b"capsafs-guest: ready", 180)
    time.sleep(1)
    q.s.sendall(b"\n")
    q.read_until(b"# ", 30)
    q.sh("stty -echo")
    return q


def main():
    src = os.path.join(tmp, "src.bin")
    with open(src, "wb") as f:
        f.write(os.urandom(4 << 20))
    host = Host()
    if not host.wait(lambda l: l.startswith("listening"), 10):
        sys.exit("echo host did not start")
    q = boot()
    out, st = q.sh("ls /dev/vsock; cat /sys/class/vsock/vsock/device/uevent 2>/dev/null | head -2; dmesg | grep -i vsock | tail -3")
    log(out)
    host.cmd("ready")
    check("device ready after guest boot", host.wait(lambda l: l == "ready 1", 10) is not None)

    # guest -> host echo, small
    out, st = q.sh("echo hello-vsock | socat -t 5 - VSOCK-CONNECT:2:1024")
    check("guest->host echo", "hello-vsock" in out and st == 0, out.strip()[-200:])

    # guest -> host bulk: 4 MiB generated in the guest, md5 on both ends
    q.sh("dd if=/dev/urandom of=/tmp/g.bin bs=1M count=4 2>/dev/null")
    out, _ = q.sh("md5sum /tmp/g.bin")
    gsum = out.split()[-2] if False else [w for w in out.split() if len(w) == 32][0]
    n0 = len(host.lines)
    t0 = time.time()
    out, st = q.sh("socat -u -t 10 /tmp/g.bin VSOCK-CONNECT:2:1025", 300)
    l = host.wait(lambda l: " done rx=4194304" in l, 60)
    dt = time.time() - t0
    sinks = [x for x in host.lines[n0:] if "accepted" in x and "1025" in x]
    sid = sinks[-1].split()[1] if sinks else "?"
    hsum = md5("/tmp/vsock-sink-%s.bin" % sid) if sinks else None
    check("guest->host 4 MiB md5", l is not None and hsum == gsum,
          "guest %s host %s, %.1f s" % (gsum, hsum, dt))

    # guest -> host echo of 2 MiB with half-close: what comes back is identical
    out, st = q.sh("head -c 2097152 /tmp/g.bin > /tmp/h.bin; socat -t 30 VSOCK-CONNECT:2:1024 - < /tmp/h.bin | md5sum; md5sum /tmp/h.bin", 300)
    sums = [w for w in out.split() if len(w) == 32]
    check("guest->host echo 2 MiB + half-close", len(sums) == 2 and sums[0] == sums[1], out.strip()[-200:])

    # host -> guest bulk via the source port (guest dials, host sends a file)
    out, st = q.sh("socat -u VSOCK-CONNECT:2:1026 - | md5sum", 300)
    sums = [w for w in out.split() if len(w) == 32]
    check("host->guest 4 MiB md5 (guest dials)", sums and sums[0] == md5(src), out.strip()[-120:])

    # host -> guest connect: guest listens and echoes with cat
    q.sh("(socat VSOCK-LISTEN:2000,fork EXEC:cat &) ; sleep 1")
    outp = os.path.join(tmp, "back.bin")
    n0 = len(host.lines)
    host.cmd("connect 2000 %s %s" % (src, outp))
    l = host.wait(lambda l: "connecting to guest port 2000" in l, 10)
    cid_ = l.split()[1] if l else "?"
    l = host.wait(lambda l: l.startswith("conn %s " % cid_) and ("done" in l or "closed" in l), 300)
    check("host->guest connect + 4 MiB echo md5", l is not None and "done" in l and
          os.path.exists(outp) and md5(outp) == md5(src), str(l))

    # rough throughput under TCG (informational): 64 MiB each way
    t0 = time.time()
    q.sh("dd if=/dev/zero bs=65536 count=1024 2>/dev/null | socat -u - VSOCK-CONNECT:2:1025", 600)
    host.wait(lambda l: " done rx=67108864" in l, 120)
    log("INFO guest->host 64 MiB: %.0f MB/s (TCG, incl. socat)" % (64 * 1.048576 / (time.time() - t0)))
    big = os.path.join(tmp, "big.bin")
    with open(big, "wb") as f:
        f.write(b"\0" * (64 << 20))
    q.sh("(socat -u VSOCK-LISTEN:2001 - | wc -c > /tmp/wc.txt &); sleep 1")
    t0 = time.time()
    host.cmd("connect 2001 %s %s" % (big, os.path.join(tmp, "none.bin")))
    l = host.wait(lambda l: "tx=67108864" in l, 300)
    log("INFO host->guest 64 MiB: %.0f MB/s (TCG, incl. socat) %s" % (64 * 1.048576 / (time.time() - t0), l))

    # host -> guest connect with nobody listening: refused
    n0 = len(host.lines)
    host.cmd("connect 2999 %s %s" % (src, outp + "2"))
    l = host.wait(lambda l: "closed" in l and host.lines.index(l) >= n0, 30)
    check("host->guest connect refused", l is not None and "refused" in l, str(l))

    # guest -> host to an unserved port: refused
    out, st = q.sh("socat -t 2 - VSOCK-CONNECT:2:4000 </dev/null; echo rc=$?")
    check("guest->host refused", "refused" in out.lower() or "rc=1" in out, out.strip()[-150:])

    # QEMU goes away: connections reset, a new QEMU reconnects
    q.sh("(socat VSOCK-CONNECT:2:1024 EXEC:'sleep 100' &); sleep 1")
    q.kill()
    l = host.wait(lambda l: "closed Connection reset" in l, 10)
    # and the guest sees its socket reset too on the next boot (new guest)
    check("qemu exit resets connections", l is not None, str(l))
    host.cmd("ready")
    check("device not ready without qemu", host.wait(lambda l: l == "ready 0", 10) is not None)
    q = boot()
    out, st = q.sh("echo second-boot | socat -t 5 - VSOCK-CONNECT:2:1024")
    check("reconnect after qemu restart: echo", "second-boot" in out, out.strip()[-100:])
    q.s.sendall(b"poweroff\n")
    try:
        q.p.wait(60)
    except subprocess.TimeoutExpired:
        pass
    q.kill()
    host.cmd("quit")
    host.p.wait(10)
    bad = [n for n, ok in results if not ok]
    log("%d checks, %d failed %s" % (len(results), len(bad), bad))
    log("logs in", tmp)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
