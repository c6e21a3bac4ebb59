"""What a destination accepts from a source's Header, decided once, before any page flows.

The rules (``rules.py``) decide whether a Header is well-formed; this decides whether *this* destination
can take it: its page size, the memory size the operator allowed, how many vCPUs it can run, and whether
it would lay the memory out in the same slots. A Header outside that is refused with HeaderMismatchError,
which the connection tells the source as a MISMATCH abort with the same words.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dirtylog.errors import DirtylogError
from dirtylog.kvm.memslot import SlotLayout
from dirtylog.migration.protocol.errors import HeaderMismatchError
from dirtylog.migration.protocol.events import Header

#: The slots a destination builds for ``(memory bytes, slot count)``.
SlotPlanner = Callable[[int, int], tuple[SlotLayout, ...]]


@dataclass(frozen=True)
class HeaderAcceptance:
    """Limits a destination puts on the Header; None accepts any value."""

    page_size: int | None = None
    memory_bytes: int | None = None  # the one memory size accepted (the operator's --memory)
    max_memory_bytes: int | None = None  # the largest a Header may claim otherwise (--max-memory)
    max_vcpus: int | None = None
    plan_slots: SlotPlanner | None = None

    def check(self, header: Header) -> None:
        """Refuse a Header this destination was not set up for."""
        if self.page_size is not None and header.page_size != self.page_size:
            raise HeaderMismatchError(
                f"the source uses {header.page_size}-byte pages, this destination {self.page_size}-byte pages: "
                "give both sides the same page size"
            )
        if self.memory_bytes is not None and header.memory_bytes != self.memory_bytes:
            raise HeaderMismatchError(
                f"the source's guest has {describe(header.slots, header.page_size)} of memory, this destination "
                f"accepts {self.memory_bytes / 2**20:.1f} MiB (--memory): give both sides the same memory size"
            )
        limit = self.max_memory_bytes
        if self.memory_bytes is None and limit is not None and header.memory_bytes > limit:
            raise HeaderMismatchError(
                f"the source's guest has {describe(header.slots, header.page_size)} of memory, more than the "
                f"{limit / 2**30:.1f} GiB this destination accepts: start it with --memory of that "
                "size, or raise --max-memory"
            )
        if self.max_vcpus is not None and header.vcpus > self.max_vcpus:
            raise HeaderMismatchError(
                f"the source's guest has {header.vcpus} vCPUs, this destination runs at most {self.max_vcpus}"
            )
        if self.plan_slots is not None:
            try:
                ours = self.plan_slots(header.memory_bytes, len(header.slots))
            except DirtylogError as error:
                raise HeaderMismatchError(f"this destination cannot lay out the source's memory, "
                                          f"{describe(header.slots, header.page_size)}: {error}") from None
            if _geometry(ours) != _geometry(header.slots):
                raise HeaderMismatchError(
                    f"the source's memory is {describe(header.slots, header.page_size)}, laid out as "
                    f"{_ranges(header.slots)}; this destination lays that size out as {_ranges(ours)}: "
                    "give both sides the same memory size and slot count"
                )


def describe(slots: tuple[SlotLayout, ...], page_size: int) -> str:
    """``512.0 MiB (131072 pages in 2 slots)``."""
    pages = sum(s.memory_size for s in slots) // page_size
    return f"{pages * page_size / 2**20:.1f} MiB ({pages} pages in {len(slots)} slot{'s' * (len(slots) != 1)})"


def _geometry(slots: tuple[SlotLayout, ...]) -> list[tuple[int, int]]:
    return sorted((s.guest_phys_addr, s.memory_size) for s in slots)


def _ranges(slots: tuple[SlotLayout, ...]) -> str:
    return ", ".join(f"[{a:#x}, {a + n:#x})" for a, n in _geometry(slots))
