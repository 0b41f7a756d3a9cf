#!/usr/bin/env python3
"""Write the seed corpora under fuzz/corpus/<harness>/ (run from anywhere).
Seeds follow each harness's input format (see the comment at the top of each
fuzz_*.c); they are small, meaningful starting points, not coverage dumps."""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def put(harness, name, data):
    d = os.path.join(HERE, "corpus", harness)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ---- fuzz_hybrid: [n][n bytes] chunks
def chunks(*parts):
    return b"".join(bytes([len(p)]) + p for p in parts)


put("fuzz_hybrid", "connect", chunks(b"CONNECT 1234\n"))
put("fuzz_hybrid", "connect-crlf-data", chunks(b"CONNECT 52\r\nhello"))
put("fuzz_hybrid", "split", chunks(b"CON", b"NECT 4294", b"967294\n", b"tail"))
put("fuzz_hybrid", "too-big", chunks(b"CONNECT 4294967295\n"))
put("fuzz_hybrid", "no-newline", chunks(b"CONNECT " + b"9" * 60, b"99999"))
put("fuzz_hybrid", "lowercase", chunks(b"connect 5\n"))

# ---- fuzz_ctl_attr: [target][len u16][bytes]; target%4: 0 attr (index
# target/4 in attr_table), 1 vm ctl, 2 vsock ctl, 3 parsers (+ two u64)
ATTRS = ["kernel", "initrd", "cmdline", "cpus", "memory", "cid"]


def rec(target, payload, extra=b""):
    return bytes([target]) + struct.pack("<H", len(payload)) + payload + extra


def attr(name, val):
    return rec(4 * ATTRS.index(name), val)


put("fuzz_ctl_attr", "cpus", attr("cpus", b"4\n") + attr("cpus", b"256"))
put("fuzz_ctl_attr", "memory", attr("memory", b"1024\n") + attr("memory", b"0x10"))
put("fuzz_ctl_attr", "cid", attr("cid", b"4242\n") + attr("cid", b"7") + attr("cid", b"2"))
put("fuzz_ctl_attr", "cmdline", attr("cmdline", b"console=ttyS0 quiet\n") + attr("cmdline", b"a\nb"))
put("fuzz_ctl_attr", "kernel", attr("kernel", b"/nonexistent\n") + attr("kernel", b"relative") +
    attr("initrd", b"\n"))
put("fuzz_ctl_attr", "vm-ctl", rec(1, b"start\n") + rec(1, b"stop") + rec(1, b"restart now") +
    rec(1, b"kill"))
put("fuzz_ctl_attr", "vsock-ctl", rec(2, b"listen 5\n") + rec(2, b"connect 7 /tmp/x.sock") +
    rec(2, b"listen 5") + rec(2, b"close 5") + rec(2, b"close 9") + rec(2, b"listen 4294967295") +
    rec(2, b"listen 1 relative"))
put("fuzz_ctl_attr", "parsers", rec(3, b"18446744073709551615\n", struct.pack("<QQ", 0, 2**64 - 1)) +
    rec(3, b"007", struct.pack("<QQ", 1, 255)))

# ---- fuzz_vhost_user: see fuzz_vhost_user.c
GET_FEATURES, SET_FEATURES, SET_OWNER, SET_MEM_TABLE = 1, 2, 3, 5
SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, GET_VRING_BASE = 8, 9, 10, 11
SET_VRING_KICK, SET_VRING_CALL = 12, 13
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_VRING_ENABLE = 15, 16, 17, 18
GET_CONFIG = 24
UVA = 0x7F0000000000
GPA = 0x40000000
MIB = 1 << 20


def vmsg(req, payload=b"", flags=1, fds=(), kick=False, split=None):
    ctl = len(fds)
    kinds = 0
    for i, k in enumerate(fds):
        kinds |= k << (2 * i)
    if split is not None:
        ctl |= 0x20
    if kick:
        ctl |= 0x40
    out = bytes([ctl]) + struct.pack("<HBBH", kinds, req, flags, len(payload)) + payload
    if split is not None:
        out += bytes([split])
    return out


def u64(v):
    return struct.pack("<Q", v)


def st(i, n):
    return struct.pack("<II", i, n)


def vaddr(i, desc, avail, used):
    return struct.pack("<IIQQQQ", i, 0, UVA + desc, UVA + used, UVA + avail, 0)


def memtable():
    return (struct.pack("<II", 2, 0) + struct.pack("<QQQQ", GPA, MIB, UVA, 0) +
            struct.pack("<QQQQ", GPA + MIB, MIB, UVA + MIB, MIB))


FEATS = (1 << 32) | (1 << 30) | (1 << 29) | (1 << 28)
setup = (vmsg(GET_FEATURES) + vmsg(GET_PROTOCOL_FEATURES) + vmsg(SET_PROTOCOL_FEATURES, u64(0x208)) +
         vmsg(SET_OWNER) + vmsg(GET_CONFIG, struct.pack("<III", 0, 8, 0) + u64(0)) +
         vmsg(SET_FEATURES, u64(FEATS)) + vmsg(SET_MEM_TABLE, memtable(), fds=(0, 0)))
for i in range(2):
    base = i * 0x4000
    setup += (vmsg(SET_VRING_NUM, st(i, 64)) + vmsg(SET_VRING_BASE, st(i, 0)) +
              vmsg(SET_VRING_ADDR, vaddr(i, base, base + 0x1000, base + 0x2000)) +
              vmsg(SET_VRING_CALL, u64(i), fds=(2,)) + vmsg(SET_VRING_KICK, u64(i), fds=(1,)))
for i in range(2):
    setup += vmsg(SET_VRING_ENABLE, st(i, 1), kick=(i == 1))
put("fuzz_vhost_user", "qemu-setup", setup)
put("fuzz_vhost_user", "qemu-setup-stop", setup + vmsg(GET_VRING_BASE, st(0, 0)) +
    vmsg(GET_VRING_BASE, st(1, 0)) + vmsg(SET_VRING_KICK, u64(0x100)))
put("fuzz_vhost_user", "reply-ack", vmsg(SET_PROTOCOL_FEATURES, u64(0x208)) +
    vmsg(SET_OWNER, flags=1 | 8) + vmsg(SET_VRING_NUM, st(5, 64), flags=1 | 8) +
    vmsg(GET_QUEUE_NUM, split=5))
put("fuzz_vhost_user", "bad-memtable", vmsg(SET_MEM_TABLE, memtable(), fds=(0,)) +
    vmsg(SET_MEM_TABLE, memtable(), fds=(0, 3)) + vmsg(SET_MEM_TABLE, memtable()[:20], fds=(0, 0)))

# ---- fuzz_vring_device: [cfg] then ops (see fuzz_vring_device.c)
REQUEST, RESPONSE, RST, SHUTDOWN, RW, CREDIT_UPDATE, CREDIT_REQUEST = 1, 2, 3, 4, 5, 6, 7


def cfg(event_idx=False, indirect=False, log2num=6):
    return bytes([(1 if event_idx else 0) | (2 if indirect else 0) | (log2num << 2)])


def rxpost(cnt=16, size=4096, mode=0):
    return bytes([5, cnt, mode]) + struct.pack("<H", size)


def pkt(op, guest=0, host=0, plen=0, layout=0, flags=0, kick=True, dial_reply=False,
        fwd_cnt=0):
    sel = (flags & 3) << 6
    if kick:
        sel |= 0x80
    ports = (guest & 3) | ((host & 7) << 2) | (0x80 if dial_reply else 0)
    return (bytes([4, sel, ports, layout]) + struct.pack("<H", plen) + bytes([op]) +
            struct.pack("<I", fwd_cnt))


def host(action, conn=0, arg=0):
    return bytes([6, action, conn]) + struct.pack("<H", arg)


def desc(ring, idx, addr, length, flags, nxt):
    return bytes([0 | (ring << 7)]) + struct.pack("<HIIHH", idx, addr, length, flags, nxt)


def avail(ring, head):
    return bytes([1 | (ring << 7)]) + struct.pack("<H", head)


def kick(ring):
    return bytes([3 | (ring << 7)])


for ei in (False, True):
    for layout in range(6):
        put("fuzz_vring_device", "stream-layout%d%s" % (layout, "-eventidx" if ei else ""),
            cfg(ei, True) + rxpost() + pkt(REQUEST) + pkt(RW, plen=3000, layout=layout) +
            host(0, 0, 2000) + pkt(SHUTDOWN, flags=1) + host(2, 0, 1) + pkt(RST))
put("fuzz_vring_device", "host-dial", cfg() + rxpost() + host(4, 0, 0) +
    pkt(RESPONSE, dial_reply=True) + host(0, 0, 4000) + pkt(CREDIT_UPDATE, dial_reply=True,
                                                             fwd_cnt=4000) + host(3, 0))
put("fuzz_vring_device", "refused-and-stray", cfg() + rxpost() + pkt(REQUEST, host=4) +
    pkt(RW, guest=2, host=1, plen=10) + pkt(CREDIT_REQUEST, guest=3) + pkt(99 % 9))
put("fuzz_vring_device", "close-both", cfg() + rxpost(mode=1) + pkt(REQUEST) + pkt(RW, plen=100) +
    pkt(SHUTDOWN, flags=3) + host(1, 0, 50) + host(3, 0))
put("fuzz_vring_device", "no-rx-buffers", cfg(log2num=2) + pkt(REQUEST) + pkt(REQUEST, guest=1) +
    pkt(RW, plen=500) + host(0, 0, 4000) + rxpost(cnt=4, size=60))
put("fuzz_vring_device", "desc-loop", cfg(log2num=3) + desc(1, 0, 0x8000, 44, 1, 1) +
    desc(1, 1, 0x8000, 44, 1, 0) + avail(1, 0) + kick(1) + rxpost())
put("fuzz_vring_device", "indirect-bad", cfg(indirect=True) + desc(1, 0, 0x8000, 48, 4 | 1, 1) +
    avail(1, 0) + kick(1) + desc(1, 1, 0xC0000000 | 20, 16, 4, 0) + avail(1, 1) + kick(1))
put("fuzz_vring_device", "restart-mid", cfg() + rxpost() + pkt(REQUEST) + pkt(RW, plen=100) +
    bytes([8, 1]) + struct.pack("<H", 7) + pkt(RW, plen=100) + host(0, 0, 100))
