"""Writing a layer: ``PATH.partial`` until it is whole and on disk, then renamed to ``PATH``.

The compiled save loop writes the data (``fd``, at ``DATA_OFFSET + rank * 4096``); :meth:`LayerWriter.finish`
writes the index, the metadata and, last, the head, then flushes the file to disk; :meth:`LayerWriter.commit`
gives it its name. A failure anywhere leaves no file that looks whole: :meth:`LayerWriter.abort` removes the
partial one, and an unfinished file has no head (its first page is a hole) so nothing would open it anyway.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from dirtylog.migration.payload.digest import MULTIPLIERS
from dirtylog.migration.protocol.events import Header
from dirtylog.snapshot import _kernels
from dirtylog.snapshot.errors import SnapshotWriteError
from dirtylog.snapshot.format import (
    IDENTITY_SIZE,
    Head,
    Kind,
    Metadata,
    bitmap_hash,
    chunk_count,
    metadata_checksum,
    nwords,
)

_WHY = {errno.ENOSPC: "the disk is full", errno.EFBIG: "the file size limit is reached (ulimit -f)",
        errno.EDQUOT: "the disk quota is exhausted", errno.EIO: "an I/O error"}


def describe_write_error(code: int) -> str:
    """``no space left on device (the disk is full)``."""
    text = os.strerror(code).lower()
    return f"{text} ({_WHY[code]})" if code in _WHY else text


class LayerWriter:
    """One layer being written; ``held`` is a bitmap of the pages it holds (None: all, a full snapshot)."""

    def __init__(self, path: str | os.PathLike[str], npages: int, held: npt.NDArray[np.uint64] | None) -> None:
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.kind = Kind.FULL if held is None else Kind.INCREMENTAL
        self.npages = npages
        words = nwords(npages)
        self.held = np.full(words, ~np.uint64(0), dtype=np.uint64) if held is None else held
        self.ranks = np.empty(words + 1, dtype=np.int64)
        _kernels.rank_words(self.held, self.ranks)
        self.count = int(self.ranks[-1])
        self.fps = np.zeros(self.count, dtype=np.uint64)
        self.zero = np.zeros(words, dtype=np.uint64)
        self.saved = np.zeros(words, dtype=np.uint8)  # a byte per block of 64 pages, for the save loop
        try:
            # Mode 0600: the file holds a VM's memory.
            self.fd = os.open(self.partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError as error:
            raise SnapshotWriteError(f"cannot create {self.partial}: {error.strerror}") from None

    def finish(self, header: Header, vcpu_states: tuple[bytes, ...], digest: bytes, info: dict[str, Any],
               parent: bytes | None) -> Head:
        """Write index, metadata and head after the data, and flush the file to disk; returns the head."""
        checks = np.zeros(chunk_count(self.npages), dtype=np.uint64)
        _kernels.chunk_checks(self.zero, self.fps, self.ranks, MULTIPLIERS, checks)
        held_hash = bytes(16) if self.kind is Kind.FULL else bitmap_hash(self.held)
        meta = Metadata(header, vcpu_states, digest, checks, held_hash, info)
        encoded = meta.encode()
        index_offset, index_length, meta_offset = Head.plan(self.kind, self.npages, self.count)
        head = Head(self.kind, self.npages, self.count, index_offset, index_length, meta_offset, len(encoded),
                    meta.identity, parent or bytes(IDENTITY_SIZE), metadata_checksum(encoded))
        parts: list[bytes | memoryview] = [self.zero.astype("<u8", copy=False).data]
        if self.kind is Kind.INCREMENTAL:
            parts.append(self.held.astype("<u8", copy=False).data)
        if self.count:
            parts.append(self.fps.astype("<u8", copy=False).data)
        self._write(parts, index_offset)
        self._write([encoded], meta_offset)
        self._write([head.pack()], 0)
        try:
            os.fsync(self.fd)
        except OSError as error:
            raise self.error(error.errno or errno.EIO) from None
        return head

    def _write(self, parts: list[bytes | memoryview], offset: int) -> None:
        for part in parts:
            view = memoryview(part).cast("B")
            while view:
                try:
                    written = os.pwrite(self.fd, view, offset)
                except OSError as error:
                    raise self.error(error.errno or errno.EIO) from None
                view, offset = view[written:], offset + written

    def error(self, code: int) -> SnapshotWriteError:
        """The error for a write that failed with ``code``."""
        return SnapshotWriteError(f"cannot write snapshot {self.path}: {describe_write_error(code)}")

    def commit(self) -> None:
        """Give the whole file its name, durably."""
        os.close(self.fd)
        self.fd = -1
        try:
            os.replace(self.partial, self.path)
        except OSError as error:
            with contextlib.suppress(OSError):
                os.unlink(self.partial)
            raise SnapshotWriteError(f"cannot name snapshot {self.path}: {error.strerror}") from None
        # The file is whole and named; making the name durable is best effort (a directory that cannot be
        # flushed, say on some network filesystems, must not turn a good snapshot into a failed one).
        with contextlib.suppress(OSError):
            directory = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)

    def abort(self) -> None:
        """Discard what was written."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        with contextlib.suppress(OSError):
            os.unlink(self.partial)
