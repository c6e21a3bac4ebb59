"""What ``/proc`` says about a process: its mappings, status, threads, file descriptors and memory.

``/proc/PID/maps`` is parsed with one compiled regular expression over the whole text (C speed; a Python
process has a few hundred lines and the tracker re-reads them at every collection), keeping the kernel's
own names: ``[heap]``, ``[stack]``, a file's path, and ``anon`` where the kernel prints nothing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from pathlib import Path
from typing import NamedTuple

from dirtylog.linux.errors import NoSuchProcessError, ProcessExitedError, PtraceNotPermittedError
from dirtylog.units import PAGE_SIZE

# Each pattern starts with a literal newline (the text is given one in front): the engine then tries a
# match only at line starts, which halves the time against ``^`` with MULTILINE (100 us for 330 lines).
_MAPS_LINE = re.compile(rb"\n([0-9a-f]+)-([0-9a-f]+) (\S{4}) ([0-9a-f]+) (\S+) (\d+) *(.*)")
# The same, for writable (private, or also shared) lines only: the tracker's question, answered without
# touching the others.
_WRITABLE_PRIVATE_LINE = re.compile(rb"\n([0-9a-f]+)-([0-9a-f]+) ([r-]w[x-]p) ([0-9a-f]+) (\S+) (\d+) *(.*)")
_WRITABLE_LINE = re.compile(rb"\n([0-9a-f]+)-([0-9a-f]+) ([r-]w[x-][ps]) ([0-9a-f]+) (\S+) (\d+) *(.*)")
_Fields = tuple[bytes, bytes, bytes, bytes, bytes, bytes, bytes]
ANON = "anon"  # the name we give a mapping the kernel prints without one


class Mapping(NamedTuple):
    """One line of ``/proc/PID/maps``: a virtual memory area ``[start, end)``.

    A named tuple, not a dataclass: a refresh builds one per new line, and tuples cost a fifth as much.
    Equal lines give equal (and equally hashed) mappings, so results can be keyed by them.
    """

    start: int
    end: int
    perms: str
    offset: int = 0
    dev: str = "00:00"
    inode: int = 0
    path: str = ""

    @property
    def name(self) -> str:
        """The mapping as ``maps`` names it: ``[heap]``, ``[stack]``, a file, or ``anon``."""
        return self.path or ANON

    @property
    def label(self) -> str:
        """A name that tells mappings apart: the name and the start address."""
        return f"{self.name}@{self.start:#x}"

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def npages(self) -> int:
        return self.size // PAGE_SIZE

    @property
    def writable(self) -> bool:
        return self.perms[1] == "w"

    @property
    def executable(self) -> bool:
        return self.perms[2] == "x"

    @property
    def private(self) -> bool:
        return self.perms[3] == "p"

    @property
    def kind(self) -> str:
        """``heap``, ``stack``, ``file``, ``anon`` or ``special`` (``[vdso]`` and the like)."""
        if self.path == "[heap]":
            return "heap"
        if self.path.startswith("[stack"):
            return "stack"
        if self.path.startswith("["):
            return "special"
        return "file" if self.inode else "anon"


def _mapping(fields: _Fields) -> Mapping:
    start, end, perms, offset, dev, inode, path = fields
    return Mapping(int(start, 16), int(end, 16), perms.decode(), int(offset, 16), dev.decode(), int(inode),
                   path.decode(errors="surrogateescape"))


def _pattern(writable_private_only: bool, writable_only: bool) -> re.Pattern[bytes]:
    if writable_private_only:
        return _WRITABLE_PRIVATE_LINE
    return _WRITABLE_LINE if writable_only else _MAPS_LINE


def parse_maps(text: bytes, *, writable_private_only: bool = False, writable_only: bool = False) -> list[Mapping]:
    """The mappings in the text of a ``/proc/PID/maps`` file, in address order (all of them, or only the
    writable private ones, or only the writable ones)."""
    return [_mapping(fields) for fields in _pattern(writable_private_only, writable_only).findall(b"\n" + text)]


def not_permitted_reason(pid: int) -> str:
    """Why this process may not ptrace ``pid`` (which also guards its ``/proc`` files: maps, mem, pagemap),
    from what ``/proc`` tells, with what to do about it."""
    reasons = []
    try:
        fields = status(pid)
    except NoSuchProcessError:
        fields = {}
    tracer = int(fields.get("TracerPid", "0") or 0)
    if tracer:
        reasons.append(f"process {pid} is already traced by process {tracer} (a debugger or strace?); "
                       "a process has one tracer at a time: detach it first")
    uids = fields.get("Uid", "").split()
    if uids and os.geteuid() != 0 and str(os.geteuid()) not in uids:
        reasons.append(f"process {pid} belongs to user {uids[0]}, not to you (uid {os.geteuid()}): "
                       "run as that user or as root")
    scope = ptrace_scope()
    if scope == 1 and os.geteuid() != 0:
        reasons.append("kernel.yama.ptrace_scope is 1: only a parent may trace its children; start the program "
                       "under dirtylog (dirtylog track -- COMMAND), run as root, or "
                       "`sysctl kernel.yama.ptrace_scope=0`")
    elif scope == 2:
        reasons.append("kernel.yama.ptrace_scope is 2: only root (CAP_SYS_PTRACE) may trace; run as root")
    elif scope == 3:
        reasons.append("kernel.yama.ptrace_scope is 3: ptrace is disabled on this host until reboot")
    if not reasons:
        reasons.append("the process may be non-dumpable (setuid, or prctl(PR_SET_DUMPABLE, 0)) or protected by a "
                       "security module; run as root")
    return "; ".join(reasons)


def _access_denied(pid: int | str, what: str) -> PtraceNotPermittedError:
    return PtraceNotPermittedError(f"may not ptrace process {pid} (reading /proc/{pid}/{what} needs ptrace access): "
                                   f"{not_permitted_reason(int(pid))}", errno.EACCES)


class MapsReader:
    """``/proc/PID/maps`` kept open and re-read from the start (seq_file regenerates it on each read)."""

    def __init__(self, pid: int | str) -> None:
        self.pid = pid
        self._parsed: dict[_Fields, Mapping] = {}
        try:
            self._fd = os.open(f"/proc/{pid}/maps", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NoSuchProcessError(f"no process {pid}: /proc/{pid} does not exist") from None
        except PermissionError:
            raise _access_denied(pid, "maps") from None

    def read(self) -> bytes:
        """The current text of the file."""
        chunks = []
        try:
            os.lseek(self._fd, 0, os.SEEK_SET)
            while chunk := os.read(self._fd, 1 << 16):
                chunks.append(chunk)
        except ProcessLookupError:
            raise ProcessExitedError(f"process {self.pid} exited", errno.ESRCH) from None
        return b"".join(chunks)

    def mappings(self, *, writable_private_only: bool = False, writable_only: bool = False) -> list[Mapping]:
        """The current mappings (filtered as :func:`parse_maps`); lines seen at the previous call are not
        parsed again."""
        pattern = _pattern(writable_private_only, writable_only)
        known = self._parsed
        lines = pattern.findall(b"\n" + self.read())
        self._parsed = {fields: known.get(fields) or _mapping(fields) for fields in lines}
        return list(self._parsed.values())

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def read_maps(pid: int | str, *, writable_private_only: bool = False) -> list[Mapping]:
    """The mappings of process ``pid`` (``"self"`` for this one)."""
    reader = MapsReader(pid)
    try:
        return reader.mappings(writable_private_only=writable_private_only)
    finally:
        reader.close()


def process_exists(pid: int) -> bool:
    """Whether ``pid`` names a process (a zombie counts: it still has an entry)."""
    return Path(f"/proc/{pid}").is_dir()


def status(pid: int | str) -> dict[str, str]:
    """``/proc/PID/status`` as a dictionary of its fields (``State``, ``Uid``, ``TracerPid``, ``Seccomp``...)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        raise NoSuchProcessError(f"no process {pid}: /proc/{pid} does not exist") from None
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def threads(pid: int) -> list[int]:
    """The thread ids of process ``pid``, the thread-group leader first."""
    try:
        tids = sorted(int(name) for name in os.listdir(f"/proc/{pid}/task"))
    except FileNotFoundError:
        raise NoSuchProcessError(f"no process {pid}: /proc/{pid} does not exist") from None
    return sorted(tids, key=lambda tid: tid != pid)


def userfaultfd_fds(pid: int | str) -> list[int]:
    """File descriptors of ``pid`` that are userfaultfds (their link reads ``anon_inode:[userfaultfd]``)."""
    found = []
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        raise NoSuchProcessError(f"no process {pid}: /proc/{pid} does not exist") from None
    for name in names:
        with contextlib.suppress(OSError):  # an fd closed while we look
            if os.readlink(f"/proc/{pid}/fd/{name}") == "anon_inode:[userfaultfd]":
                found.append(int(name))
    return sorted(found)


def ptrace_scope() -> int | None:
    """Yama's ``kernel.yama.ptrace_scope`` (0 classic, 1 restricted to descendants, 2 admin only, 3 none),
    or None where Yama is not built in."""
    try:
        return int(Path("/proc/sys/kernel/yama/ptrace_scope").read_text())
    except (OSError, ValueError):
        return None


def read_memory(pid: int | str, address: int, size: int) -> bytes:
    """``size`` bytes of process ``pid``'s memory at ``address`` (``/proc/PID/mem``; needs ptrace access)."""
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.pread(fd, size, address)
    finally:
        os.close(fd)


class MemoryReader:
    """``/proc/PID/mem`` kept open, for repeated reads of another process's memory."""

    def __init__(self, pid: int | str) -> None:
        self.pid = pid
        try:
            self._fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NoSuchProcessError(f"no process {pid}: /proc/{pid} does not exist") from None
        except PermissionError:
            raise _access_denied(pid, "mem") from None

    def read(self, address: int, size: int) -> bytes:
        return os.pread(self._fd, size, address)

    def read_into(self, address: int, buffer: bytearray | memoryview) -> int:
        return os.preadv(self._fd, [buffer], address)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
