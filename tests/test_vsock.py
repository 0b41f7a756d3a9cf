"""vsock through capsafs, end to end: a real guest with socat on AF_VSOCK inside it, and on
the host the vsock/<port> nodes, the exported per-port sockets, the Firecracker hybrid
socket and vsock.sock_<port> forwarding.  One guest is booted for the whole module.

AF_VSOCK is only ever used inside the guest; the host side is FUSE files and Unix sockets.
"""

import errno
import hashlib
import os
import random
import select
import socket
import threading
import time

import pytest

import util

pytestmark = pytest.mark.watchdog(300)


@pytest.fixture(scope="module")
def g(module_mount_factory, guest_options):
    """One mount, one booted guest: .vm, .con (console), .sockdir (SOCKDIR/<vm>)."""
    m = module_mount_factory(guest_options)
    vm = m.mkvm("vs")
    con = vm.boot()

    class G:
        pass

    g = G()
    g.mount, g.vm, g.con = m, vm, con
    g.sockdir = os.path.join(m.sockdir, vm.name)
    yield g
    g.con.close()


def guest_bg(g, command):
    """Start a command in the guest's background; wait until the shell took it."""
    g.con.check(f"( ({command}) >/dev/null 2>&1 </dev/null & )")


def wait_guest_listening(g, port):
    """A guest listener is up once a connection to it is accepted (the node's open
    succeeds); ECONNREFUSED means not yet."""
    deadline = time.monotonic() + 30
    while True:
        try:
            fd = util.fs(os.open, g.vm.path("vsock", str(port)), os.O_RDWR)
            os.close(fd)
            return
        except OSError as e:
            if e.errno != errno.ECONNREFUSED or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def declare(g, line):
    e = g.vm.write("vsock/ctl", line)
    assert e == 0, f"{line}: {util.errname(e)}: {g.vm.error()}"


def read_until_eof(fd, timeout=60, limit=1 << 30):
    out = bytearray()
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"no EOF within {timeout} s ({len(out)} bytes read)"
        chunk = util.call_with_timeout(os.read, fd, 1 << 16, timeout=left, what="read node")
        if not chunk:
            return bytes(out)
        out += chunk
        assert len(out) <= limit


def unix_connect(path, timeout=30):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    return s


def recv_all(s, timeout=60):
    s.settimeout(timeout)
    out = bytearray()
    while True:
        chunk = s.recv(1 << 16)
        if not chunk:
            return bytes(out)
        out += chunk


# ---- guest connects, host accepts ------------------------------------------------------

def test_guest_connection_to_listen_port_is_accepted_by_opening_the_node(g):
    declare(g, "listen 1024")
    guest_bg(g, "echo hello-node | socat - VSOCK-CONNECT:2:1024")
    fd = util.fs(os.open, g.vm.path("vsock", "1024"), os.O_RDONLY)
    try:
        assert read_until_eof(fd) == b"hello-node\n"
    finally:
        os.close(fd)


def test_open_of_listen_port_with_nothing_queued_is_eagain_with_o_nonblock(g):
    declare(g, "listen 1025")
    e = util.errno_of(os.open, g.vm.path("vsock", "1025"), os.O_RDWR | os.O_NONBLOCK)
    assert e == errno.EAGAIN


def test_guest_connections_queue_until_the_host_accepts(g):
    declare(g, "listen 1026")
    for i in range(3):
        guest_bg(g, f"echo queued-{i} | socat - VSOCK-CONNECT:2:1026")
    got = set()
    for _ in range(3):
        fd = util.fs(os.open, g.vm.path("vsock", "1026"), os.O_RDONLY)
        try:
            got.add(read_until_eof(fd))
        finally:
            os.close(fd)
    assert got == {b"queued-0\n", b"queued-1\n", b"queued-2\n"}


def test_blocked_accept_is_interrupted_by_a_signal(g):
    declare(g, "listen 1027")
    import signal
    import subprocess
    p = subprocess.Popen(["cat", g.vm.path("vsock", "1027")], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    try:
        time.sleep(1)
        assert p.poll() is None, "open of a listen port with no guest connection returned"
        p.send_signal(signal.SIGINT)
        p.wait(timeout=30)  # generous: a loaded sanitizer build is slow to answer
        assert p.returncode != 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


# ---- host connects, guest accepts ------------------------------------------------------

def test_node_open_dials_the_guest_listener_and_is_full_duplex(g):
    guest_bg(g, 'socat VSOCK-LISTEN:2000,fork EXEC:"tr a-z A-Z"')
    wait_guest_listening(g, 2000)
    fd = util.fs(os.open, g.vm.path("vsock", "2000"), os.O_RDWR)
    try:
        assert os.write(fd, b"shout\n") == 6
        p = select.poll()
        p.register(fd, select.POLLIN)
        assert p.poll(20000), "poll: no POLLIN for the guest's answer"
        assert os.read(fd, 100) == b"SHOUT\n"
    finally:
        os.close(fd)


def test_open_with_no_guest_listener_is_econnrefused(g):
    e = util.errno_of(os.open, g.vm.path("vsock", "2999"), os.O_RDWR)
    assert e == errno.ECONNREFUSED


def test_name_that_is_not_a_port_is_enoent(g):
    for name in ("abc", "-1", "4294967295", "0x10", "01"):
        assert util.errno_of(os.open, g.vm.path("vsock", name), os.O_RDWR) == errno.ENOENT


def test_many_connections_per_port_at_once(g):
    # backlog: the opens come faster than socat forks, and a full accept queue refuses
    guest_bg(g, "socat VSOCK-LISTEN:2001,fork,backlog=32 EXEC:cat")
    wait_guest_listening(g, 2001)
    fds = [util.fs(os.open, g.vm.path("vsock", "2001"), os.O_RDWR) for _ in range(8)]
    try:
        for i, fd in enumerate(fds):
            os.write(fd, f"conn-{i}\n".encode())
        for i, fd in enumerate(fds):
            want = f"conn-{i}\n".encode()
            got = b""
            while len(got) < len(want):
                got += util.call_with_timeout(os.read, fd, 100, what="read echo")
            assert got == want
    finally:
        for fd in fds:
            os.close(fd)


# ---- exported per-port sockets ---------------------------------------------------------

def test_connect_port_socket_dials_the_guest_for_each_client(g):
    guest_bg(g, 'socat VSOCK-LISTEN:2002,fork EXEC:"tr a-z A-Z"')
    wait_guest_listening(g, 2002)
    declare(g, "connect 2002")
    path = os.path.join(g.sockdir, "2002.sock")
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o600)
    for word in (b"one", b"two"):
        with unix_connect(path) as s:
            s.sendall(word + b"\n")
            s.shutdown(socket.SHUT_WR)  # the half-close reaches tr, which then exits
            assert recv_all(s) == word.upper() + b"\n"


def test_listen_port_socket_pairs_each_client_with_the_next_guest_connection(g):
    declare(g, "listen 1030")
    path = os.path.join(g.sockdir, "1030.sock")
    with unix_connect(path) as s:
        guest_bg(g, "echo to-the-socket | socat - VSOCK-CONNECT:2:1030")
        assert recv_all(s) == b"to-the-socket\n"


def test_declared_path_is_used_for_the_socket(g, tmp_path):
    path = os.path.join("/tmp", f"capsafs-test-{os.getpid()}.sock")
    declare(g, f"listen 1031 {path}")
    try:
        assert os.path.exists(path)
        ports = g.vm.read("vsock/ports")
        assert f"1031 listen {path} 0\n" in ports
    finally:
        declare(g, "close 1031")
    assert not os.path.exists(path), "close left the socket behind"


def test_ports_file_counts_open_connections(g):
    declare(g, "listen 1032")
    guest_bg(g, "(echo counted; sleep 5) | socat - VSOCK-CONNECT:2:1032")
    fd = util.fs(os.open, g.vm.path("vsock", "1032"), os.O_RDONLY)
    try:
        line = [l for l in g.vm.read("vsock/ports").splitlines() if l.startswith("1032 ")][0]
        assert line.split()[3] == "1"
    finally:
        os.close(fd)
    line = [l for l in g.vm.read("vsock/ports").splitlines() if l.startswith("1032 ")][0]
    assert line.split()[3] == "0"


# ---- the Firecracker hybrid socket -----------------------------------------------------

def test_hybrid_connect_answers_ok_and_carries_the_stream(g):
    guest_bg(g, "socat VSOCK-LISTEN:2003,fork EXEC:cat")
    wait_guest_listening(g, 2003)
    with unix_connect(os.path.join(g.sockdir, "vsock.sock")) as s:
        s.sendall(b"CONNECT 2003\nfirst bytes ride along\n")
        f = s.makefile("rb")
        ok = f.readline()
        assert ok.startswith(b"OK ") and ok.endswith(b"\n")
        assert int(ok[3:-1]) > 0
        assert f.readline() == b"first bytes ride along\n"


def test_hybrid_connect_split_across_writes(g):
    guest_bg(g, "socat VSOCK-LISTEN:2004,fork EXEC:cat")
    wait_guest_listening(g, 2004)
    with unix_connect(os.path.join(g.sockdir, "vsock.sock")) as s:
        for piece in (b"CON", b"NECT 20", b"04", b"\n"):
            s.sendall(piece)
            time.sleep(0.1)
        f = s.makefile("rb")
        assert f.readline().startswith(b"OK ")
        s.sendall(b"after\n")
        assert f.readline() == b"after\n"


@pytest.mark.parametrize("command", [b"HELLO 2005\n", b"CONNECT abc\n", b"CONNECT\n",
                                     b"x" * 200])
def test_hybrid_bad_command_closes_the_connection(g, command):
    with unix_connect(os.path.join(g.sockdir, "vsock.sock")) as s:
        try:
            s.sendall(command)
            assert recv_all(s, timeout=20) == b""
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed with our bytes unread: a reset is a close too


def test_hybrid_connect_with_no_guest_listener_closes_the_connection(g):
    with unix_connect(os.path.join(g.sockdir, "vsock.sock")) as s:
        s.sendall(b"CONNECT 2998\n")
        assert recv_all(s, timeout=20) == b""


def test_guest_connection_to_undeclared_port_goes_to_vsock_sock_listener(g):
    path = os.path.join(g.sockdir, "vsock.sock_5000")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(4)
    srv.settimeout(30)
    try:
        guest_bg(g, "echo forwarded | socat - VSOCK-CONNECT:2:5000")
        c, _ = srv.accept()
        with c:
            assert recv_all(c) == b"forwarded\n"
    finally:
        srv.close()
        os.unlink(path)


def test_guest_connection_to_undeclared_port_without_listener_is_refused(g):
    status, out = g.con.run("echo x | socat - VSOCK-CONNECT:2:5001", timeout=30)
    assert status != 0
    assert "refused" in out.lower() or "reset" in out.lower(), out


# ---- half-close and closing mid-stream -------------------------------------------------

def test_client_half_close_reaches_the_guest_and_the_answer_still_comes_back(g):
    guest_bg(g, 'socat VSOCK-LISTEN:2006,fork EXEC:"wc -c"')
    wait_guest_listening(g, 2006)
    with unix_connect(os.path.join(g.sockdir, "vsock.sock")) as s:
        s.sendall(b"CONNECT 2006\n" + b"z" * 5000)
        s.shutdown(socket.SHUT_WR)
        out = recv_all(s)
    assert out.startswith(b"OK ")
    assert out.split(b"\n", 1)[1].strip() == b"5000"


def test_guest_half_close_is_eof_on_the_node_and_writes_still_go_through(g):
    # the guest sends "bye", shuts its sending side, and counts what it receives
    declare(g, "listen 1033")
    guest_bg(g, "(echo bye; sleep 2) | socat -t5 - VSOCK-CONNECT:2:1033 >/tmp/got-1033")
    fd = util.fs(os.open, g.vm.path("vsock", "1033"), os.O_RDWR)
    try:
        assert read_until_eof(fd) == b"bye\n"
    finally:
        os.close(fd)


def test_guest_closing_mid_stream_gives_eof_then_epipe(g):
    guest_bg(g, "socat VSOCK-LISTEN:2007 SYSTEM:'head -c 10 >/dev/null'")
    time.sleep(1.5)  # the listener serves one connection: no probing it
    fd = util.fs(os.open, g.vm.path("vsock", "2007"), os.O_RDWR)
    try:
        e = 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                util.call_with_timeout(os.write, fd, b"y" * 4096, what="write node")
            except OSError as ex:
                e = ex.errno
                break
        assert e in (errno.EPIPE, errno.ECONNRESET), util.errname(e)
    finally:
        os.close(fd)


def test_host_closing_mid_stream_is_eof_in_the_guest(g):
    declare(g, "listen 1034")
    guest_bg(g, "socat -u VSOCK-CONNECT:2:1034 - | wc -c >/tmp/count-1034")
    fd = util.fs(os.open, g.vm.path("vsock", "1034"), os.O_RDWR)
    os.write(fd, b"a" * 1234)
    os.close(fd)
    deadline = time.monotonic() + 30
    while True:
        status, out = g.con.run("cat /tmp/count-1034 2>/dev/null")
        if out.strip() == "1234":
            break
        assert time.monotonic() < deadline, f"guest counted {out!r}"
        time.sleep(0.5)


# ---- bulk data with checksums ----------------------------------------------------------

MIB64 = 64 << 20


def test_64_mib_host_to_guest_through_the_node_checksummed(g):
    data = random.Random(1).randbytes(MIB64)
    want = hashlib.sha256(data).hexdigest()
    declare(g, "listen 1040")
    guest_bg(g, "socat -u VSOCK-CONNECT:2:1040 - | sha256sum >/tmp/sum-1040")
    fd = util.fs(os.open, g.vm.path("vsock", "1040"), os.O_WRONLY)
    try:
        view = memoryview(data)
        while view:
            n = util.call_with_timeout(os.write, fd, view[:1 << 20], timeout=60,
                                       what="write 1 MiB")
            view = view[n:]
    finally:
        os.close(fd)
    deadline = time.monotonic() + 120
    while True:
        status, out = g.con.run("cat /tmp/sum-1040 2>/dev/null")
        if out.strip():
            break
        assert time.monotonic() < deadline, "the guest never finished its checksum"
        time.sleep(1)
    assert out.split()[0] == want


def test_64_mib_guest_to_host_through_a_socket_checksummed(g):
    g.con.check("dd if=/dev/urandom of=/tmp/blob bs=1M count=64 2>/dev/null", timeout=120)
    want = g.con.check("sha256sum /tmp/blob", timeout=120).split()[0]
    declare(g, "listen 1041")
    with unix_connect(os.path.join(g.sockdir, "1041.sock")) as s:
        guest_bg(g, "socat -u FILE:/tmp/blob VSOCK-CONNECT:2:1041")
        s.settimeout(120)
        got, n = util.sha256_to_eof(lambda: s.recv(1 << 20))
    g.con.check("rm -f /tmp/blob")
    assert n == MIB64
    assert got == want


def test_16_mib_guest_to_host_through_the_node_checksummed(g):
    # reads are answered straight from the connection's buffers (peek/consume)
    g.con.check("dd if=/dev/urandom of=/tmp/blob16 bs=1M count=16 2>/dev/null", timeout=120)
    want = g.con.check("sha256sum /tmp/blob16", timeout=120).split()[0]
    declare(g, "listen 1042")
    guest_bg(g, "socat -u FILE:/tmp/blob16 VSOCK-CONNECT:2:1042")
    fd = util.fs(os.open, g.vm.path("vsock", "1042"), os.O_RDONLY)
    try:
        # odd read sizes: a read may end inside a buffered packet
        got, n = util.sha256_to_eof(lambda: util.call_with_timeout(
            os.read, fd, 100003, timeout=60, what="read node"))
    finally:
        os.close(fd)
    g.con.check("rm -f /tmp/blob16")
    assert n == 16 << 20
    assert got == want


# ---- many at once ----------------------------------------------------------------------

def echo_many_at_once(g, port, payloads):
    """Open one connection per payload through a connect-port socket to a forking guest
    echo, all before any is used; send every payload, then check every echo."""
    guest_bg(g, f"socat VSOCK-LISTEN:{port},fork,backlog=256 EXEC:cat")
    wait_guest_listening(g, port)
    declare(g, f"connect {port}")
    path = os.path.join(g.sockdir, f"{port}.sock")
    socks = []
    try:
        for _ in payloads:
            socks.append(unix_connect(path))
        for s, want in zip(socks, payloads):
            s.sendall(want)
        for i, (s, want) in enumerate(zip(socks, payloads)):
            got = b""
            s.settimeout(60)
            while len(got) < len(want):
                chunk = s.recv(65536)
                assert chunk, f"connection {i} closed early after {len(got)} bytes"
                got += chunk
            assert got == want, f"connection {i}: echo differs"
    finally:
        for s in socks:
            s.close()


def test_100_concurrent_connections_through_the_connect_socket(g):
    echo_many_at_once(g, 2010, [f"payload-{i:03d}\n".encode() * 10 for i in range(100)])


def test_connections_past_the_window_budget_still_carry_data_both_ways(g):
    """A VM's connections share a 32 MiB receive budget: about the first 120 get 256 KiB
    windows, then each new one less, down to 4 KiB (capsafs(1), Limits).  A Linux guest
    must keep sending through a 4 KiB window: 64 KiB echoed on the last connections of 170
    takes a dozen credit updates each."""
    echo_many_at_once(g, 2011, [f"small-{i:03d}\n".encode() for i in range(150)] +
                      [os.urandom(65536) for _ in range(20)])


# ---- lifecycle -------------------------------------------------------------------------

def test_stale_socket_file_is_replaced_at_declaration(g):
    path = os.path.join(g.sockdir, "1050.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # a socket file nobody listens on: what a crashed daemon leaves
    declare(g, "listen 1050")
    with unix_connect(path) as s:
        guest_bg(g, "echo fresh | socat - VSOCK-CONNECT:2:1050")
        assert recv_all(s) == b"fresh\n"


def test_killing_the_vm_resets_its_connections_and_spares_the_other_vm(g):
    other = g.mount.mkvm("other")
    ocon = other.boot()
    try:
        guest_bg(g, "socat VSOCK-LISTEN:2020,fork EXEC:cat")
        wait_guest_listening(g, 2020)
        ocon.check("( socat VSOCK-LISTEN:2021,fork EXEC:cat >/dev/null 2>&1 </dev/null & )")
        fd = util.fs(os.open, g.vm.path("vsock", "2020"), os.O_RDWR)
        declare(g, "listen 1060")
        hybrid = os.path.join(g.sockdir, "vsock.sock")
        assert os.path.exists(hybrid)
        reader = {}

        def blocked_read():
            try:
                reader["data"] = os.read(fd, 100)
            except OSError as e:
                reader["errno"] = e.errno

        t = threading.Thread(target=blocked_read, daemon=True)
        t.start()
        time.sleep(0.5)
        assert g.vm.ctl("kill") == 0
        t.join(20)
        assert not t.is_alive(), "a blocked read survived the VM's death"
        assert reader.get("errno") == errno.ECONNRESET or reader.get("data") == b"", reader
        assert util.errno_of(os.write, fd, b"x") in (errno.ECONNRESET, errno.EPIPE)
        os.close(fd)
        assert util.errno_of(os.open, g.vm.path("vsock", "2020"), os.O_RDWR) == errno.ENOTCONN
        assert not os.path.exists(hybrid), "the hybrid socket outlived the VM"
        assert not os.path.exists(os.path.join(g.sockdir, "1060.sock"))
        # the other VM still talks
        deadline = time.monotonic() + 30
        while True:
            try:
                ofd = util.fs(os.open, other.path("vsock", "2021"), os.O_RDWR)
                break
            except OSError as e:
                assert e.errno == errno.ECONNREFUSED and time.monotonic() < deadline
                time.sleep(0.3)
        try:
            os.write(ofd, b"still here\n")
            assert util.call_with_timeout(os.read, ofd, 100, what="read") == b"still here\n"
        finally:
            os.close(ofd)
        # declarations survive the restart and the sockets come back
        g.con.close()
        g.con = g.vm.boot()
        assert os.path.exists(os.path.join(g.sockdir, "1060.sock"))
        assert os.path.exists(hybrid)
    finally:
        ocon.close()
        other.kill()
