"""System calls injected into real processes by ptrace: results, and targets that go on unharmed."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import time

import pytest

from dirtylog.linux import abi, procfs
from dirtylog.linux.errors import NoSuchProcessError, PtraceNotPermittedError
from dirtylog.linux.inject import RemoteSyscalls, find_syscall_instruction

# Sleeps in short steps and prints a checksum of its work: an injection between steps must not change it.
SLEEPER = textwrap.dedent("""
    import hashlib, sys, time
    sys.stdout.write("ready\\n"); sys.stdout.flush()
    digest = hashlib.sha256()
    for i in range(30):
        time.sleep(0.02)
        digest.update(i.to_bytes(4, "little"))
    print(digest.hexdigest(), flush=True)
""")
EXPECTED = __import__("hashlib").sha256(b"".join(i.to_bytes(4, "little") for i in range(30))).hexdigest()


def start(code: str) -> subprocess.Popen[str]:
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline() == "ready\n"
    return child


def test_an_injected_call_runs_as_the_target_and_the_target_goes_on() -> None:
    child = start(SLEEPER)
    try:
        with RemoteSyscalls(child.pid) as remote:
            assert remote.call(abi.SYS_getpid) == child.pid
            assert remote.call(abi.SYS_close, 4000) == -errno.EBADF
            fd = remote.checked_call(abi.SYS_userfaultfd, os.O_CLOEXEC | abi.UFFD_USER_MODE_ONLY, what="userfaultfd")
            assert procfs.userfaultfd_fds(child.pid) == [fd]
            remote.checked_call(abi.SYS_close, fd, what="close")
        assert procfs.userfaultfd_fds(child.pid) == [] and procfs.status(child.pid)["TracerPid"] == "0"
        out, _ = child.communicate(timeout=10)
        assert out.strip() == EXPECTED and child.returncode == 0
    finally:
        child.kill()


def test_a_blocking_read_interrupted_by_the_injection_is_restarted() -> None:
    echo = "import sys\nsys.stdout.write('ready\\n'); sys.stdout.flush()\nprint(sys.stdin.readline().upper(), end='')\n"
    child = start(echo)
    try:
        time.sleep(0.05)  # let it block in read(0, ...)
        with RemoteSyscalls(child.pid) as remote:
            assert remote.call(abi.SYS_getpid) == child.pid
        out, _ = child.communicate("still here\n", timeout=10)
        assert out == "STILL HERE\n" and child.returncode == 0
    finally:
        child.kill()


def test_many_sessions_in_a_row_leave_the_target_unharmed() -> None:
    child = start(SLEEPER)
    try:
        for _ in range(20):
            with RemoteSyscalls(child.pid) as remote:
                remote.call(abi.SYS_getpid)
        out, _ = child.communicate(timeout=10)
        assert out.strip() == EXPECTED
    finally:
        child.kill()


def test_the_syscall_instruction_is_found_in_the_vdso() -> None:
    address = find_syscall_instruction(os.getpid())
    [vdso] = [m for m in procfs.read_maps("self") if m.path == "[vdso]"]
    assert vdso.start <= address < vdso.end
    assert procfs.read_memory("self", address, 2) == abi.SYSCALL_INSTRUCTION


def test_a_pid_that_does_not_exist() -> None:
    with pytest.raises(NoSuchProcessError, match="no process 4194000"):
        RemoteSyscalls(4194000).__enter__()


def test_another_users_process_may_not_be_traced() -> None:
    child = start(SLEEPER)
    read_end, write_end = os.pipe()
    try:
        helper = os.fork()
        if helper == 0:  # pragma: no cover - runs in the forked child
            os.close(read_end)
            message = "no error"
            try:
                os.setgid(65534)
                os.setuid(65534)
                with RemoteSyscalls(child.pid):
                    pass
            except PtraceNotPermittedError as error:
                message = f"refused: {error}"
            except BaseException as error:  # reported to the parent
                message = f"{type(error).__name__}: {error}"
            os.write(write_end, message.encode())
            os._exit(0)
        os.close(write_end)
        os.waitpid(helper, 0)
        message = os.read(read_end, 4096).decode()
        assert message.startswith("refused: may not ptrace process"), message
        assert "belongs to user 0" in message
        out, _ = child.communicate(timeout=10)
        assert out.strip() == EXPECTED
    finally:
        os.close(read_end)
        child.kill()
