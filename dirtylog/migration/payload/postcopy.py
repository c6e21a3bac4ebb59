"""Post-copy pages as NumPy arrays: the pages the source sends after the switch-over, with their fingerprints.

The source gathers pages out of its (paused) guest memory with their fingerprints in one pass
(``digest.gather``), as in pre-copy; :func:`make_postcopy_pages` marks the zero pages among them and builds the
frame's event. The destination reads one back with :func:`postcopy_pages`, which checks every page against the
fingerprint the source computed: a page that does not match is refused before the guest can read it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from dirtylog.migration.payload.digest import fingerprints
from dirtylog.migration.payload.pages import pfns_from_runs
from dirtylog.migration.protocol.codec import as_bytes_view
from dirtylog.migration.protocol.errors import RemoteProtocolError
from dirtylog.migration.protocol.events import PostcopyPages


def make_postcopy_pages(starts: NDArray[np.uint64], lengths: NDArray[np.uint32], pages: NDArray[np.uint8],
                        prints: NDArray[np.uint64], *, requested: bool, page_size: int) -> PostcopyPages:
    """The event for the runs ``(starts, lengths)`` whose pages are the rows of ``pages`` (gathered in run order)
    with fingerprints ``prints``; zero pages (a fingerprint of 0 confirmed by looking) travel as markers."""
    zero = prints == 0
    if zero.any():
        zero[zero] = ~pages[zero].view(np.uint64).any(axis=1)
    if not zero.any():
        return PostcopyPages(starts, lengths, None, prints, as_bytes_view(pages), requested, page_size)
    data = as_bytes_view(pages[~zero])
    return PostcopyPages(starts, lengths, zero, np.where(zero, np.uint64(0), prints), data, requested, page_size)


@dataclass(frozen=True)
class ReceivedPages:
    """A received PostcopyPages, checked: every page's number, whether it is a zero page, its fingerprint, and
    the non-zero pages (rows, a view of the frame)."""

    pfns: NDArray[np.uint64]
    zero: NDArray[np.bool_]
    fingerprints: NDArray[np.uint64]
    data: NDArray[np.uint8]


def postcopy_pages(event: PostcopyPages) -> ReceivedPages:
    """The pages of ``event``, each checked against its fingerprint; RemoteProtocolError names the first that does
    not match (install nothing of the frame then)."""
    pfns = pfns_from_runs(event.starts, event.lengths)
    zero = event.zero if event.zero is not None else np.zeros(pfns.size, dtype=np.bool_)
    nonzero = int(pfns.size - np.count_nonzero(zero))
    raw = as_bytes_view(event.data)
    if len(raw) != nonzero * event.page_size:
        raise RemoteProtocolError(f"post-copy data of {len(raw)} bytes does not hold {nonzero} pages")
    data = np.frombuffer(raw, dtype=np.uint8).reshape(nonzero, event.page_size)
    expected = np.asarray(event.fingerprints)
    actual = fingerprints(data) if nonzero else np.empty(0, dtype=np.uint64)
    bad = np.flatnonzero(actual != expected[~zero])
    if bad.size:
        page = int(pfns[~zero][bad[0]])
        raise RemoteProtocolError(f"post-copy page {page:#x} does not match the fingerprint the source sent with it "
                                  f"({int(actual[bad[0]]):#018x}, expected {int(expected[~zero][bad[0]]):#018x}): "
                                  "it is refused before the guest can read it")
    return ReceivedPages(pfns, zero, expected, data)
