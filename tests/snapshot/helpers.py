"""Helpers of the snapshot tests: memory as it was, memory as restored, pages that changed."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt

from dirtylog.machine import Machine
from dirtylog.snapshot.layer import Layer
from dirtylog.units import PAGE_SIZE


def paused_memory(machine: Machine) -> npt.NDArray[np.uint8]:
    """Pause ``machine`` and copy its memory (the reference a snapshot of it must restore to)."""
    machine.pause()
    return machine.memory.copy()


def restored_memory(path: str | os.PathLike[str], **options: object) -> npt.NDArray[np.uint8]:
    """The memory ``path`` restores to, read through a restored machine that never runs (its pages arrive as
    this thread reads them, and in the background)."""
    machine = Machine.restore(path, resume=False, **options)  # type: ignore[arg-type]
    try:
        copy = machine.memory.copy()
        machine.wait_restored(30)
        return copy
    finally:
        machine.stop()


def changed_pages(before: npt.NDArray[np.uint8], after: npt.NDArray[np.uint8]) -> npt.NDArray[np.intp]:
    """Pages whose bytes differ."""
    return np.flatnonzero((before.reshape(-1, PAGE_SIZE) != after.reshape(-1, PAGE_SIZE)).any(axis=1))


def held_pages(path: str | os.PathLike[str]) -> npt.NDArray[np.intp]:
    """The pages a layer holds."""
    with Layer.open(path) as layer:
        return np.flatnonzero(np.unpackbits(layer.held_words().view(np.uint8), bitorder="little"))


def first_differences(a: npt.NDArray[np.uint8], b: npt.NDArray[np.uint8]) -> str:
    pages = changed_pages(a, b)
    return f"{pages.size} pages differ, first {pages[:8].tolist()}"


def wait_progress(machine: Machine, beyond: list[int], timeout: float = 10.0) -> list[int]:
    """Wait until every vCPU's progress counter is past ``beyond``; returns the counters."""
    deadline = time.monotonic() + timeout
    while True:
        progress = machine.vcpu_progress
        if all(now > then for now, then in zip(progress, beyond, strict=True)):
            return progress
        machine.check()
        if time.monotonic() > deadline:
            raise AssertionError(f"progress {progress} did not pass {beyond} in {timeout} s")
        time.sleep(0.01)


def corrupt(path: Path, offset: int, xor: int = 0x40) -> None:
    """Flip bits of one byte of a file."""
    with path.open("r+b") as file:
        file.seek(offset)
        value = file.read(1)[0]
        file.seek(offset)
        file.write(bytes([value ^ xor]))
