"""The user's view: the commands of the README, run by bash in the mount."""

import re
import subprocess
import time

import pytest

import util


def sh(cwd, script, timeout=30):
    """Run a bash script in cwd; return CompletedProcess (text)."""
    try:
        return subprocess.run(["bash", "-c", script], cwd=cwd, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise util.Timeout(f"bash script hung for {timeout} s:\n{script}\n"
                           f"stdout so far: {e.stdout!r}") from None


def ok(cwd, script, timeout=30):
    r = sh(cwd, script, timeout)
    assert r.returncode == 0, f"{script}\nexit {r.returncode}\nstderr: {r.stderr}"
    return r.stdout


@pytest.fixture
def smnt(mnt):
    return mnt.mnt


def test_make_and_configure_a_vm(smnt):
    out = ok(smnt, """
        mkdir demo
        cat demo/state
        echo 2 > demo/cpus; cat demo/cpus
        printf 256 > demo/memory; cat demo/memory
        { printf 'console=ttyS0'; printf ' quiet\\n'; } > demo/cmdline; cat demo/cmdline
        echo > demo/initrd; cat demo/initrd
        ls
        ls demo/vsock
    """)
    assert out == "stopped\n2\n256\nconsole=ttyS0 quiet\n\ndemo\nctl\nports\n"


def test_errors_reach_the_shell_as_strerror(smnt):
    ok(smnt, "mkdir demo")
    cases = [
        ("echo 0 > demo/cpus", "Numerical result out of range"),
        ("echo many > demo/cpus", "Invalid argument"),
        ("echo vmlinuz > demo/kernel", "Invalid argument"),
        ("echo /nonexistent > demo/kernel", "No such file or directory"),
        ("echo stop > demo/ctl", "Invalid argument"),
        ("echo reboot > demo/ctl", "Invalid argument"),
        ("mkdir demo", "File exists"),
        ("mkdir .demo", "Invalid argument"),
        ("mkdir demo/sub", "Operation not permitted"),
        ("rm -f demo/cpus", "Operation not permitted"),
        ("touch newfile", "Operation not permitted"),
        ("mv demo other", "Operation not permitted"),
        ("echo close 9 > demo/vsock/ctl", "No such file or directory"),
    ]
    for cmd, msg in cases:
        r = sh(smnt, cmd)
        assert r.returncode != 0 and msg in r.stderr, (cmd, r.returncode, r.stderr)
        assert ok(smnt, "cat demo/error").strip(), f"no error sentence after {cmd}"
    assert ok(smnt, "cat demo/cpus demo/state") == "1\nstopped\n"


def test_boot_talk_and_tear_down_from_the_shell(smnt, guest):
    ok(smnt, "mkdir vm")
    assert ok(smnt, "echo start > vm/ctl && cat vm/state") == "running\n"
    # the README's wait for a booted guest
    ok(smnt, "timeout 150 grep -m1 'capsafs-guest: ready' vm/console >/dev/null", timeout=160)
    # a keystroke line into the console, its output read back from it
    ok(smnt, "echo 'echo hi-$((6*7))' > vm/console")
    out = ok(smnt, "timeout 30 grep -m1 '^hi-' vm/console", timeout=40)
    assert out.strip() == "hi-42"
    pid = ok(smnt, "cat vm/pid").strip()
    assert re.fullmatch(r"\d+", pid)
    assert ok(smnt, f"cat /proc/{pid}/comm").startswith("qemu-system")
    # running VMs refuse changes and removal
    r = sh(smnt, "echo 4 > vm/cpus")
    assert r.returncode != 0 and "Device or resource busy" in r.stderr, r.stderr
    r = sh(smnt, "rmdir vm")
    assert r.returncode != 0 and "Device or resource busy" in r.stderr, r.stderr
    # log: the same text, to EOF
    log = ok(smnt, "cat vm/log")
    assert "capsafs-guest: ready" in log and "hi-42" in log
    assert ok(smnt, "echo kill > vm/ctl && cat vm/state && cat vm/pid | wc -c") == "stopped\n0\n"
    ok(smnt, "rmdir vm")
    assert ok(smnt, "ls -A") == ""


def test_tail_of_log_gives_its_last_lines(smnt, guest):
    """tail(1) trusts st_size to seek near the end: a log longer than st_size claims must
    still tail right (st_size 0, as /proc does, or the real length)."""
    ok(smnt, "mkdir vm && echo start > vm/ctl")
    try:
        ok(smnt, "timeout 150 grep -m1 'capsafs-guest: ready' vm/console >/dev/null", timeout=160)
        ok(smnt, "echo 'echo last-$((40+2))' > vm/console")
        ok(smnt, "timeout 30 grep -m1 '^last-42' vm/console >/dev/null", timeout=40)
        # the guest may still print (its prompt, a kernel message): compare only when the log
        # did not change between a read before and a read after the tail
        for _ in range(20):
            full = ok(smnt, "cat vm/log")
            got = ok(smnt, "tail -n 3 vm/log")
            if ok(smnt, "cat vm/log") == full:
                break
            time.sleep(0.5)
        assert len(full) > 8192
        want = "".join(full.splitlines(keepends=True)[-3:])
        assert got == want, f"tail -n 3 vm/log gave {got!r}, the log ends {want!r}"
    finally:
        sh(smnt, "echo kill > vm/ctl")


def test_vsock_ports_from_the_shell(smnt, mnt):
    out = ok(smnt, """
        mkdir vm
        echo 'listen 1024' > vm/vsock/ctl
        echo 'connect 2000 /tmp/capsafs-shell-2000.sock' > vm/vsock/ctl
        sort vm/vsock/ports
        ls vm/vsock
    """)
    assert out == (f"1024 listen {mnt.sockdir}/vm/1024.sock 0\n"
                   "2000 connect /tmp/capsafs-shell-2000.sock 0\n"
                   "1024\n2000\nctl\nports\n")
