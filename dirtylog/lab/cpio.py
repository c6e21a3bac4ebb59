"""Writing the initramfs: the kernel's ``newc`` cpio format (Documentation/driver-api/early-userspace).

Pure and small: a header of thirteen 8-digit hex fields after the magic ``070701``, the name and the data,
each padded to 4 bytes, and a ``TRAILER!!!`` entry. The kernel accepts several archives one after the
other in one initrd, which is how a cached root filesystem and a small per-run payload are combined
without rewriting the large one.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)


class CpioWriter:
    """A newc archive being written to ``out``; :meth:`close` writes the trailer."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._ino = 1
        self._names: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes, mtime: int = 0) -> None:
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 1, mtime, len(data), 0, 0, 0, 0, len(encoded), 0)
        header = _MAGIC + b"".join(b"%08X" % value for value in fields)
        self._out.write(header + encoded + _pad(len(header) + len(encoded)))
        self._out.write(data + _pad(len(data)))
        self._ino += 1

    def directory(self, name: str, mode: int = 0o755) -> None:
        """A directory ``name`` (relative, no leading slash), written once however often asked."""
        name = name.strip("/")
        if name and name not in self._names:
            self._names.add(name)
            self._entry(name, stat.S_IFDIR | mode, b"")

    def file(self, name: str, data: bytes, mode: int = 0o644, mtime: int = 0) -> None:
        """A regular file; its parent directories are added first."""
        name = name.strip("/")
        self._parents(name)
        self._names.add(name)
        self._entry(name, stat.S_IFREG | mode, data, mtime)

    def symlink(self, name: str, target: str) -> None:
        """A symbolic link ``name`` -> ``target``."""
        name = name.strip("/")
        self._parents(name)
        self._names.add(name)
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def _parents(self, name: str) -> None:
        parts = name.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            self.directory("/".join(parts[:depth]))

    def tree(self, root: Path, prefix: str = "") -> None:
        """Everything under ``root`` as ``prefix/relative path``: directories, files, symlinks."""
        for path in sorted(_walk(root)):
            name = f"{prefix.strip('/')}/{path.relative_to(root)}".strip("/")
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                self.symlink(name, os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                self.directory(name, stat.S_IMODE(info.st_mode))
            elif stat.S_ISREG(info.st_mode):
                self.file(name, path.read_bytes(), stat.S_IMODE(info.st_mode), int(info.st_mtime))

    def close(self) -> None:
        """Write the trailer entry that ends the archive."""
        self._entry(_TRAILER, 0, b"")


def _walk(root: Path) -> Iterable[Path]:
    for directory, dirs, files in os.walk(root):
        base = Path(directory)
        for name in dirs + files:
            yield base / name
