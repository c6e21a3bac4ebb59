"""Reading a snapshot file: open and check a layer, and map its index.

:meth:`Layer.open` reads the head and the metadata and checks everything that is cheap to check — the magic,
version, head checksum, the file's length against the head, the metadata checksum and contents, the identity
— so a foreign, truncated or corrupt file is refused before anything is built from it. The index (zero bitmap,
held bitmap, fingerprints) is mapped, not read: the held bitmap is checked when asked for (a restore needs
it whole), the rest chunk by chunk as the compiled loops first use it.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from dirtylog.snapshot.errors import SnapshotFormatError
from dirtylog.snapshot.format import HEAD_SIZE, Head, Kind, Metadata, bitmap_hash, metadata_checksum, nwords, short


@dataclass
class Layer:
    """An open, checked snapshot file. Close it (or use it as a context manager) to release the file."""

    path: Path
    head: Head
    meta: Metadata
    fd: int
    disk_bytes: int  # what it occupies on disk (holes cost nothing)
    _index: mmap.mmap | None = None

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Layer:
        """Open and check ``path``; :class:`SnapshotFormatError` says what is wrong with a file that is not a
        whole snapshot this version wrote."""
        name = str(path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SnapshotFormatError(f"no snapshot {name}: the file does not exist") from None
        except OSError as error:
            raise SnapshotFormatError(f"cannot open snapshot {name}: {error.strerror}") from None
        try:
            status = os.fstat(fd)
            if not os.path.isfile(path):
                raise SnapshotFormatError(f"{name} is not a regular file")
            head = Head.unpack(os.pread(fd, HEAD_SIZE, 0), name, status.st_size)
            data = os.pread(fd, head.meta_length, head.meta_offset)
            if len(data) != head.meta_length:
                raise SnapshotFormatError(f"{name} is truncated: its metadata is cut short")
            if metadata_checksum(data) != head.meta_checksum:
                raise SnapshotFormatError(f"{name}: the snapshot metadata is corrupt (its checksum does not match)")
            meta = Metadata.decode(data, name, head.npages)
            if meta.identity != head.identity:
                raise SnapshotFormatError(f"{name}: the head names state {short(head.identity)} but the metadata "
                                          f"describes {short(meta.identity)}: the file was altered")
            if (head.kind is Kind.FULL) != (meta.held_hash == bytes(16)):
                raise SnapshotFormatError(f"{name}: the snapshot metadata does not fit its kind")
            return cls(Path(path), head, meta, fd, status.st_blocks * 512)
        except BaseException:
            os.close(fd)
            raise

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def identity(self) -> bytes:
        return self.head.identity

    @property
    def parent(self) -> bytes | None:
        """The identity of the state this layer was taken on; None for a full snapshot."""
        return None if self.head.kind is Kind.FULL else self.head.parent

    @property
    def full(self) -> bool:
        return self.head.kind is Kind.FULL

    @property
    def info(self) -> dict[str, Any]:
        return self.meta.info

    def _map(self) -> mmap.mmap:
        if self._index is None:
            # The index starts on a page boundary (after whole pages of data), so it maps as it is.
            self._index = mmap.mmap(self.fd, self.head.index_length, mmap.MAP_SHARED, mmap.PROT_READ,
                                    offset=self.head.index_offset)
        return self._index

    def zero_words(self) -> npt.NDArray[np.uint64]:
        """The zero bitmap (a bit per guest page), mapped; checked chunk by chunk where used."""
        return np.frombuffer(self._map(), dtype="<u8", count=nwords(self.head.npages)).view(np.uint64)

    def held_words(self) -> npt.NDArray[np.uint64]:
        """The held bitmap, checked against the metadata (all ones for a full snapshot)."""
        words = nwords(self.head.npages)
        if self.full:
            return np.full(words, ~np.uint64(0), dtype=np.uint64)
        held = np.frombuffer(self._map(), dtype="<u8", count=words, offset=8 * words).view(np.uint64)
        if bitmap_hash(held) != self.meta.held_hash:
            raise SnapshotFormatError(f"{self.name}: the bitmap of the pages this layer holds is corrupt")
        count = int(np.bitwise_count(held).sum())
        if count != self.head.held:
            raise SnapshotFormatError(f"{self.name}: its bitmap holds {count} pages, its head says {self.head.held}")
        return held

    def fingerprints(self) -> npt.NDArray[np.uint64]:
        """One fingerprint per held page, in guest-frame order, mapped; checked chunk by chunk where used."""
        words = nwords(self.head.npages) * (1 if self.full else 2)
        if not self.head.held:
            return np.zeros(0, dtype=np.uint64)
        return np.frombuffer(self._map(), dtype="<u8", count=self.head.held, offset=8 * words).view(np.uint64)

    def close(self) -> None:
        if self._index is not None:
            with contextlib.suppress(BufferError):  # a NumPy view is still alive; the mapping goes with it
                self._index.close()
            self._index = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Layer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
