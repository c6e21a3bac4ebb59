"""The compiled loops of snapshots, which run without the GIL: saving a layer, and serving a restore.

Why compiled and GIL-free: a live snapshot write-protects guest RAM and a lazy restore leaves it missing, so
*any* thread touching it blocks in a page fault until these loops resolve it — a Python thread then blocks
holding the GIL, and a loop that needed the GIL would never run (``dirtylog.linux.nogil`` says more). These
loops make their system calls through ``dirtylog.linux.nogil`` and touch no Python object.

Units: a *block* is 64 guest pages (one word of every bitmap): a restore installs one block per fault, a live
snapshot saves one block per fault. The state a loop shares with Python is a few NumPy arrays:
``control[CONTROL_STOP]`` asks a loop to stop, ``stats`` says how it went (``S_*`` below).

* :func:`save_layer` writes a layer's pages to its file at ``DATA_OFFSET + rank * 4096``, fingerprints them,
  and marks zero pages (which it does not write: they stay holes). With a userfaultfd (a live snapshot) it
  also serves write faults: a written block is saved first, then its protection lifted, which wakes the
  writer; without one (``uffd == -1``) the guest is paused and the loop only writes.
* :func:`serve_restore` installs blocks into missing guest RAM from a chain of layers: on a fault first,
  in address order otherwise. Every page is checked against its fingerprint, and every index chunk against
  its check value, before the guest can see the page; a block of zero pages is the shared zero page.
* :func:`merge_layers` is the restore's reading half writing to a file instead: a chain collapsed into one
  full layer.
"""

from __future__ import annotations

import functools
from typing import Final

import numpy as np
from numba import njit
from numpy.typing import NDArray

from dirtylog.linux import nogil
from dirtylog.migration.payload._fingerprints import fingerprint_rows

PAGE: Final = 4096
WORDS: Final = 512  # 64-bit words in a page
BLOCK: Final = 64  # pages in a block
CHUNK_WORDS: Final = 64  # bitmap words in an index chunk (4096 pages)
DATA_OFFSET: Final = 4096
_GOLDEN: Final = np.uint64(0x9E3779B97F4A7C15)
_BACKGROUND_BLOCKS: Final = 16  # most blocks a loop handles in order between two looks at the fault queue
_LIVE_FLUSH_BYTES: Final = 1 << 20  # pending bytes a live save loop writes out at most at once
_PAUSED_FLUSH_BYTES: Final = 16 << 20
_IDLE_NS: Final = 20_000_000  # how long a loop with only faults left waits for one before checking `control`

# control[] (set by Python)
CONTROL_STOP: Final = 0
CONTROL_PREFETCH: Final = 1  # serve_restore: install blocks nobody asked for yet (else only faults)
CONTROL_SIZE: Final = 2

# stats[] (set by the loops)
S_STATUS: Final = 0
S_ERRNO: Final = 1
S_PAGE: Final = 2  # the page a failure concerns
S_LAYER: Final = 3  # the layer it concerns
S_FAULTS: Final = 4  # faults served
S_BLOCKS: Final = 5  # blocks installed or saved
S_ZERO_BLOCKS: Final = 6  # blocks installed as zero pages
S_PAGES_WRITTEN: Final = 7
S_ZERO_PAGES: Final = 8
S_FIRST_FAULT_NS: Final = 9  # CLOCK_MONOTONIC of the first fault read (0: none)
S_DONE_NS: Final = 10  # CLOCK_MONOTONIC when the last block was in
S_FAULT_NS: Final = 11  # total time from reading a fault to resolving it
S_FAULT_MAX_NS: Final = 12
S_FIRST_SERVED_NS: Final = 13  # CLOCK_MONOTONIC when the first fault was resolved
S_CHUNKS_CHECKED: Final = 14
STATS_SIZE: Final = 16

# statuses
NOT_STARTED: Final = -1  # set by Python before a loop starts; the loop says RUNNING once it runs without the GIL
RUNNING: Final = 0
DONE: Final = 1
STOPPED: Final = 2
CORRUPT_PAGE: Final = 3  # a page's fingerprint does not match (S_PAGE, S_LAYER)
CORRUPT_INDEX: Final = 4  # an index chunk's check does not match (S_PAGE: its first page, S_LAYER)
SHORT_READ: Final = 5  # a layer file ended early (S_LAYER)
IO_ERROR: Final = 6  # a read or write failed (S_ERRNO, S_LAYER: -1 for the output file)
UFFD_ERROR: Final = 7  # a userfaultfd ioctl failed (S_ERRNO)

U64 = NDArray[np.uint64]
I64 = NDArray[np.int64]
U8 = NDArray[np.uint8]


@njit(cache=True, nogil=True)
def popcount(x: np.uint64) -> int:
    """Set bits of a word."""
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return int((x * np.uint64(0x0101010101010101)) >> np.uint64(56))


@njit(cache=True, nogil=True)
def rank_words(held: U64, out: I64) -> None:
    """``out[w]`` = held pages before word ``w`` (``out`` has one entry more than ``held``: the total)."""
    total = 0
    for w in range(held.size):
        out[w] = total
        total += popcount(held[w])
    out[held.size] = total


@njit(cache=True, nogil=True)
def chunk_check(zero_address: int, first_word: int, words: int, fps_address: int, first_rank: int, ranks: int,
                multipliers: U64) -> np.uint64:
    """The check value of an index chunk: a linear hash (the page fingerprint's multipliers, cycled) of its
    zero-bitmap words and its held pages' fingerprints, and of their count."""
    total = np.uint64(0)
    i = 0
    for k in range(words):
        total += np.uint64(nogil.peek_u64(zero_address + 8 * (first_word + k))) * multipliers[i & (WORDS - 1)]
        i += 1
    for k in range(ranks):
        total += np.uint64(nogil.peek_u64(fps_address + 8 * (first_rank + k))) * multipliers[i & (WORDS - 1)]
        i += 1
    return total + np.uint64(i) * _GOLDEN


@njit(cache=True, nogil=True)
def chunk_checks(zero: U64, fps: U64, ranks: I64, multipliers: U64, out: U64) -> None:
    """Every chunk's check value of a layer's index (``ranks`` from :func:`rank_words` of its held bitmap)."""
    nwords = zero.size
    for c in range(out.size):
        first = c * CHUNK_WORDS
        last = min(first + CHUNK_WORDS, nwords)
        out[c] = chunk_check(zero.ctypes.data, first, last - first, fps.ctypes.data, ranks[first],
                             ranks[last] - ranks[first], multipliers)


# -- saving a layer ----------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _faulting_block(messages: U64, m: int, base: int, nblocks: int) -> int:
    """The block that message ``m`` is a page fault in, or -1 (another event, or an address outside)."""
    if messages[m * nogil.UFFD_MSG_WORDS] & np.uint64(0xFF) != nogil.UFFD_EVENT_PAGEFAULT:
        return -1
    address = messages[m * nogil.UFFD_MSG_WORDS + 2]
    if address < np.uint64(base):
        return -1
    # Through int64: numba would unify a uint64 with the int64 -1 as a float64.
    b = int(np.int64((address - np.uint64(base)) // np.uint64(PAGE * BLOCK)))
    return b if b < nblocks else -1


@njit(cache=True, nogil=True)
def _fail(stats: I64, status: int, errno: int, page: int, layer: int) -> int:
    stats[S_STATUS] = status
    stats[S_ERRNO] = errno
    stats[S_PAGE] = page
    stats[S_LAYER] = layer
    return status


# The pending write of the save loop: pages consecutive in the file (consecutive ranks), wherever they are in
# memory, go out in one pwritev. W[0] entries, W[1] their file offset, W[2] their bytes; then (address, length)
# pairs, as struct iovec.
IOV_MAX: Final = 1024
W_ENTRIES: Final = 3
WRITER_SIZE: Final = W_ENTRIES + 2 * IOV_MAX


@njit(cache=True, nogil=True)
def _flush(writer: I64, out_fd: int) -> int:
    """Write what is pending; 0 or -errno."""
    if writer[0] == 0:
        return 0
    written = nogil.pwritev(out_fd, writer[W_ENTRIES:], writer[0], writer[1])
    writer[0] = 0
    writer[2] = 0
    return written if written < 0 else 0


@njit(cache=True, nogil=True)
def _queue(writer: I64, out_fd: int, address: int, length: int, offset: int, flush_bytes: int) -> int:
    """Add ``length`` bytes at ``address`` for file ``offset`` to the pending write; 0 or -errno."""
    count = writer[0]
    if count and (writer[1] + writer[2] != offset or count == IOV_MAX or writer[2] >= flush_bytes):
        result = _flush(writer, out_fd)
        if result < 0:
            return result
        count = 0
    if count == 0:
        writer[1] = offset
    else:
        last = W_ENTRIES + 2 * (count - 1)
        if writer[last] + writer[last + 1] == address:  # contiguous in memory too: one longer buffer
            writer[last + 1] += length
            writer[2] += length
            return 0
    writer[W_ENTRIES + 2 * count] = address
    writer[W_ENTRIES + 2 * count + 1] = length
    writer[0] = count + 1
    writer[2] += length
    return 0


@njit(cache=True, nogil=True)
def _save_block(b: int, source: U64, row: int, held: U64, ranks: I64, writer: I64, out_fd: int, flush_bytes: int,
                fps: U64, zero: U64, multipliers: U64, stats: I64) -> int:
    """Fingerprint the held pages of block ``b``, whose page ``64 * b + i`` is row ``row + i`` of ``source``
    (guest memory that must not change until the pending write is flushed, or a copy of the block), and queue
    the non-zero ones on ``writer``; returns a status (RUNNING: fine)."""
    word = held[b]
    if word == 0:
        return RUNNING
    first = b * BLOCK
    base = source.ctypes.data
    i = 0
    while i < BLOCK:
        if not (word >> np.uint64(i)) & np.uint64(1):
            i += 1
            continue
        # A run of held pages: consecutive ranks, consecutive places in the file.
        j = i
        while j < BLOCK and (word >> np.uint64(j)) & np.uint64(1):
            j += 1
        rank = ranks[b] + popcount(word & ((np.uint64(1) << np.uint64(i)) - np.uint64(1)))
        fingerprint_rows(source[row + i:row + j], multipliers, fps[rank:rank + j - i])
        # Write the non-zero pages of the run, in runs of their own; zero pages stay holes.
        k = i
        while k < j:
            is_zero = False
            if fps[rank + k - i] == 0:  # a zero page's fingerprint is 0; confirm by looking
                is_zero = True
                for w in range(WORDS):
                    if source[row + k, w] != 0:
                        is_zero = False
                        break
            if is_zero:
                zero[b] |= np.uint64(1) << np.uint64(k)
                stats[S_ZERO_PAGES] += 1
                k += 1
                continue
            m = k + 1
            while m < j and fps[rank + m - i] != 0:
                m += 1
            result = _queue(writer, out_fd, base + (row + k) * PAGE, (m - k) * PAGE,
                            DATA_OFFSET + (rank + k - i) * PAGE, flush_bytes)
            if result < 0:
                return _fail(stats, IO_ERROR, -result, first + k, -1)
            stats[S_PAGES_WRITTEN] += m - k
            k = m
        i = j
    stats[S_BLOCKS] += 1
    return RUNNING


@njit(cache=True, nogil=True)
def save_layer(uffd: int, memory: U64, held: U64, ranks: I64, out_fd: int, fps: U64, zero: U64, saved: U8,
               multipliers: U64, control: I64, stats: I64) -> int:
    """Write the held pages of ``memory`` (guest RAM as ``(npages, 512)`` words) to ``out_fd``; returns a status.

    ``held``/``ranks``: the layer's pages (a bit per page) and :func:`rank_words` of them; ``fps`` (one per held
    page) and ``zero`` (a bit per page) are filled in; ``saved`` (a byte per block) tracks what is done. With
    ``uffd >= 0`` (registered over guest RAM in write-protect mode) the loop first write-protects all of guest
    RAM, then says RUNNING (Python resumes the guest then): from that moment any writer waits until its block
    is saved — a Python thread too, GIL and all, since this loop needs no GIL. Write faults are served first
    (save the block, lift its protection, which wakes the writer), other blocks in order between them.
    """
    nblocks = saved.size
    base = memory.ctypes.data
    scratch = np.zeros(8, dtype=np.int64)
    clock = np.zeros(2, dtype=np.int64)
    messages = np.zeros(64 * nogil.UFFD_MSG_WORDS, dtype=np.uint64)
    copy = np.zeros((BLOCK, WORDS), dtype=np.uint64)
    writer = np.zeros(WRITER_SIZE, dtype=np.int64)
    # Live, writes go out before protection is lifted, so keep them short; paused, let them grow.
    flush_bytes = _LIVE_FLUSH_BYTES if uffd >= 0 else _PAUSED_FLUSH_BYTES
    next_block = 0
    if uffd >= 0:
        result = nogil.uffd_writeprotect(uffd, base, nblocks * BLOCK * PAGE, True, scratch)
        if result < 0:
            return _fail(stats, UFFD_ERROR, -result, -1, -1)
    stats[S_STATUS] = RUNNING
    while True:
        if control[CONTROL_STOP]:
            return _fail(stats, STOPPED, 0, -1, -1)
        while next_block < nblocks and saved[next_block]:
            next_block += 1
        if next_block >= nblocks:
            result = _flush(writer, out_fd)
            if result < 0:
                return _fail(stats, IO_ERROR, -result, -1, -1)
            stats[S_DONE_NS] = nogil.monotonic_ns(clock)
            stats[S_STATUS] = DONE
            return DONE
        if uffd >= 0 and nogil.poll_in(uffd, 0, scratch) > 0:
            count = nogil.read_messages(uffd, messages)
            if count < 0:
                return _fail(stats, UFFD_ERROR, -count, -1, -1)
            for m in range(count):
                b = _faulting_block(messages, m, base, nblocks)
                if b < 0:
                    continue
                began = nogil.monotonic_ns(clock)
                if stats[S_FIRST_FAULT_NS] == 0:
                    stats[S_FIRST_FAULT_NS] = began
                # A writer waits: copy the block's pages as they are, let it go, then write the copy.
                was_saved = saved[b] != 0
                if not was_saved:
                    word = held[b]
                    for i in range(BLOCK):
                        if (word >> np.uint64(i)) & np.uint64(1):
                            copy[i, :] = memory[b * BLOCK + i, :]
                    saved[b] = 1
                result = nogil.uffd_writeprotect(uffd, base + b * BLOCK * PAGE, BLOCK * PAGE, False, scratch)
                if result < 0:
                    return _fail(stats, UFFD_ERROR, -result, b * BLOCK, -1)
                spent = nogil.monotonic_ns(clock) - began
                stats[S_FAULTS] += 1
                stats[S_FAULT_NS] += spent
                stats[S_FAULT_MAX_NS] = max(stats[S_FAULT_MAX_NS], spent)
                if not was_saved:
                    status = _save_block(b, copy, 0, held, ranks, writer, out_fd, flush_bytes, fps, zero, multipliers,
                                         stats)
                    result = _flush(writer, out_fd)  # before the copy is used again
                    if status != RUNNING:
                        return status
                    if result < 0:
                        return _fail(stats, IO_ERROR, -result, b * BLOCK, -1)
            continue
        # In order, straight from guest memory (still protected), a block at a time until a fault is pending;
        # then one ioctl lifts the protection of the blocks done.
        start = next_block
        end = start
        while end < nblocks and end < start + _BACKGROUND_BLOCKS:
            if not saved[end]:
                status = _save_block(end, memory, end * BLOCK, held, ranks, writer, out_fd, flush_bytes, fps, zero,
                                     multipliers, stats)
                if status != RUNNING:
                    return status
                saved[end] = 1
            end += 1
            if uffd >= 0 and nogil.poll_in(uffd, 0, scratch) > 0:
                break
        if uffd >= 0:
            result = _flush(writer, out_fd)  # the pages are in the file: now they may change
            if result < 0:
                return _fail(stats, IO_ERROR, -result, start * BLOCK, -1)
            result = nogil.uffd_writeprotect(uffd, base + start * BLOCK * PAGE, (end - start) * BLOCK * PAGE, False,
                                             scratch)
            if result < 0:
                return _fail(stats, UFFD_ERROR, -result, start * BLOCK, -1)
        next_block = end


# -- reading a chain: restore and merge ---------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _check_chunk(layer: int, chunk: int, held: U64, ranks: I64, zero_addresses: I64, fps_addresses: I64,
                 checks: U64, checked: U8, multipliers: U64, stats: I64) -> bool:
    """Whether index chunk ``chunk`` of ``layer`` matches its check value (computed once, remembered)."""
    if checked[layer, chunk]:
        return True
    nwords = held.shape[1]
    first = chunk * CHUNK_WORDS
    last = min(first + CHUNK_WORDS, nwords)
    value = chunk_check(zero_addresses[layer], first, last - first, fps_addresses[layer], ranks[layer, first],
                        ranks[layer, last] - ranks[layer, first], multipliers)
    if value != checks[layer, chunk]:
        return False
    checked[layer, chunk] = 1
    stats[S_CHUNKS_CHECKED] += 1
    return True


@njit(cache=True, nogil=True)
def fill_block(b: int, held: U64, ranks: I64, zero_addresses: I64, fps_addresses: I64, fds: I64, checks: U64,
               checked: U8, multipliers: U64, buffer: U64, prints: U64, zero_out: U8, stats: I64) -> int:
    """Read block ``b`` of the state a chain restores to into ``buffer`` (64 pages), each page from the newest
    layer holding it, and check it: index chunks against their check values, pages against their
    fingerprints. ``prints`` and ``zero_out`` receive each page's fingerprint and whether it is a zero page.
    Returns RUNNING when the block is good, DONE when it is all zero pages (``buffer`` untouched), or a
    failure status (set in ``stats``)."""
    nlayers = held.shape[0]
    first = b * BLOCK
    w = b  # the block's word in every bitmap
    chunk = w // CHUNK_WORDS
    owner = np.empty(BLOCK, dtype=np.int64)
    rank = np.empty(BLOCK, dtype=np.int64)
    all_zero = True
    for i in range(BLOCK):
        bit = np.uint64(1) << np.uint64(i)
        layer = nlayers - 1
        while layer > 0 and not held[layer, w] & bit:
            layer -= 1
        if not held[layer, w] & bit:  # the base is a full layer: it holds every page
            return _fail(stats, CORRUPT_INDEX, 0, first + i, layer)
        if not _check_chunk(layer, chunk, held, ranks, zero_addresses, fps_addresses, checks, checked, multipliers,
                            stats):
            return _fail(stats, CORRUPT_INDEX, 0, chunk * CHUNK_WORDS * 64, layer)
        owner[i] = layer
        rank[i] = ranks[layer, w] + popcount(held[layer, w] & (bit - np.uint64(1)))
        is_zero = np.uint64(nogil.peek_u64(zero_addresses[layer] + 8 * w)) & bit != 0
        zero_out[i] = is_zero
        if not is_zero:
            all_zero = False
    if all_zero:
        prints[:] = 0
        return DONE
    address = buffer.ctypes.data
    i = 0
    while i < BLOCK:
        if zero_out[i]:
            buffer[i, :] = 0
            prints[i] = 0
            i += 1
            continue
        j = i + 1  # a run from one layer, consecutive in its file
        while j < BLOCK and not zero_out[j] and owner[j] == owner[i] and rank[j] == rank[i] + (j - i):
            j += 1
        layer = owner[i]
        got = nogil.pread(fds[layer], address + i * PAGE, (j - i) * PAGE, DATA_OFFSET + rank[i] * PAGE)
        if got < 0:
            return _fail(stats, IO_ERROR, -got, first + i, layer)
        if got != (j - i) * PAGE:
            return _fail(stats, SHORT_READ, 0, first + i, layer)
        fingerprint_rows(buffer[i:j], multipliers, prints[i:j])
        for k in range(i, j):
            expected = np.uint64(nogil.peek_u64(fps_addresses[layer] + 8 * rank[k]))
            if prints[k] != expected:
                return _fail(stats, CORRUPT_PAGE, 0, first + k, layer)
        i = j
    return RUNNING


@njit(cache=True, nogil=True)
def serve_restore(uffd: int, base: int, held: U64, ranks: I64, zero_addresses: I64, fps_addresses: I64, fds: I64,
                  checks: U64, checked: U8, present: U8, multipliers: U64, control: I64, stats: I64) -> int:
    """Install the state a chain restores to into missing guest RAM at ``base`` (registered with ``uffd`` in
    missing mode), a block at a time: faulting blocks first, the others in order once
    ``control[CONTROL_PREFETCH]`` is set (a restore sets it when the vCPUs run, so that it does not compete
    with starting them for the CPUs). Returns DONE
    when every block is in, STOPPED when asked, or a failure status; a block that fails a check is never
    installed, so its faulting thread waits (Python stops the machine)."""
    nblocks = present.size
    buffer = np.zeros((BLOCK, WORDS), dtype=np.uint64)
    prints = np.zeros(BLOCK, dtype=np.uint64)
    zero = np.zeros(BLOCK, dtype=np.uint8)
    scratch = np.zeros(8, dtype=np.int64)
    clock = np.zeros(2, dtype=np.int64)
    messages = np.zeros(64 * nogil.UFFD_MSG_WORDS, dtype=np.uint64)
    next_block = 0
    remaining = nblocks - int(np.count_nonzero(present))
    stats[S_STATUS] = RUNNING  # Python waits for this before anything may touch guest RAM
    while True:
        if control[CONTROL_STOP]:
            return _fail(stats, STOPPED, 0, -1, -1)
        if remaining == 0:
            stats[S_DONE_NS] = nogil.monotonic_ns(clock)
            stats[S_STATUS] = DONE
            return DONE
        while next_block < nblocks and present[next_block]:
            next_block += 1
        background = control[CONTROL_PREFETCH] != 0 and next_block < nblocks
        ready = nogil.poll_in(uffd, 0 if background else _IDLE_NS, scratch)
        if ready < 0:
            return _fail(stats, UFFD_ERROR, -ready, -1, -1)
        if ready > 0:
            count = nogil.read_messages(uffd, messages)
            if count < 0:
                return _fail(stats, UFFD_ERROR, -count, -1, -1)
            for m in range(count):
                b = _faulting_block(messages, m, base, nblocks)
                if b < 0:
                    continue
                began = nogil.monotonic_ns(clock)
                if stats[S_FIRST_FAULT_NS] == 0:
                    stats[S_FIRST_FAULT_NS] = began
                if present[b]:  # installed since the fault was queued: the install woke it already
                    continue
                status = _install(uffd, base, b, held, ranks, zero_addresses, fps_addresses, fds, checks, checked,
                                  multipliers, buffer, prints, zero, scratch, stats)
                if status != RUNNING:
                    return status
                present[b] = 1
                remaining -= 1
                done = nogil.monotonic_ns(clock)
                if stats[S_FIRST_SERVED_NS] == 0:
                    stats[S_FIRST_SERVED_NS] = done
                stats[S_FAULTS] += 1
                stats[S_FAULT_NS] += done - began
                stats[S_FAULT_MAX_NS] = max(stats[S_FAULT_MAX_NS], done - began)
            continue
        if not background:
            continue
        end = min(nblocks, next_block + _BACKGROUND_BLOCKS)
        for b in range(next_block, end):
            if present[b]:
                continue
            status = _install(uffd, base, b, held, ranks, zero_addresses, fps_addresses, fds, checks, checked,
                              multipliers, buffer, prints, zero, scratch, stats)
            if status != RUNNING:
                return status
            present[b] = 1
            remaining -= 1
            if nogil.poll_in(uffd, 0, scratch) > 0:
                break  # a fault waits: serve it before the next block in order


@njit(cache=True, nogil=True)
def _install(uffd: int, base: int, b: int, held: U64, ranks: I64, zero_addresses: I64, fps_addresses: I64, fds: I64,
             checks: U64, checked: U8, multipliers: U64, buffer: U64, prints: U64, zero: U8, scratch: I64,
             stats: I64) -> int:
    """Fill block ``b`` and install it (UFFDIO_COPY, or UFFDIO_ZEROPAGE for a block of zero pages)."""
    status = fill_block(b, held, ranks, zero_addresses, fps_addresses, fds, checks, checked, multipliers, buffer,
                        prints, zero, stats)
    target = base + b * BLOCK * PAGE
    if status == DONE:
        result = nogil.uffd_zeropage(uffd, target, BLOCK * PAGE, scratch)
        stats[S_ZERO_BLOCKS] += 1
    elif status == RUNNING:
        result = nogil.uffd_copy(uffd, target, buffer.ctypes.data, BLOCK * PAGE, 0, scratch)
    else:
        return status
    if result < 0:
        return _fail(stats, UFFD_ERROR, -result, b * BLOCK, -1)
    stats[S_BLOCKS] += 1
    return RUNNING


@njit(cache=True, nogil=True)
def merge_layers(held: U64, ranks: I64, zero_addresses: I64, fps_addresses: I64, fds: I64, checks: U64, checked: U8,
                 multipliers: U64, out_fd: int, fps_out: U64, zero_out: U64, control: I64, stats: I64) -> int:
    """Write the state a chain restores to as one full layer to ``out_fd`` (page ``p`` at its place ``p``), with
    its fingerprints and zero bitmap, every page checked on the way. Returns DONE or a failure status."""
    nblocks = held.shape[1]
    buffer = np.zeros((BLOCK, WORDS), dtype=np.uint64)
    prints = np.zeros(BLOCK, dtype=np.uint64)
    zero = np.zeros(BLOCK, dtype=np.uint8)
    address = buffer.ctypes.data
    stats[S_STATUS] = RUNNING
    for b in range(nblocks):
        if control[CONTROL_STOP]:
            return _fail(stats, STOPPED, 0, -1, -1)
        status = fill_block(b, held, ranks, zero_addresses, fps_addresses, fds, checks, checked, multipliers,
                            buffer, prints, zero, stats)
        first = b * BLOCK
        if status == DONE:
            zero_out[b] = ~np.uint64(0)
            fps_out[first:first + BLOCK] = 0
            stats[S_ZERO_PAGES] += BLOCK
            continue
        if status != RUNNING:
            return status
        fps_out[first:first + BLOCK] = prints
        i = 0
        while i < BLOCK:
            if zero[i]:
                zero_out[b] |= np.uint64(1) << np.uint64(i)
                stats[S_ZERO_PAGES] += 1
                i += 1
                continue
            j = i + 1
            while j < BLOCK and not zero[j]:
                j += 1
            written = nogil.pwrite(out_fd, address + i * PAGE, (j - i) * PAGE, DATA_OFFSET + (first + i) * PAGE)
            if written < 0:
                return _fail(stats, IO_ERROR, -written, first + i, -1)
            stats[S_PAGES_WRITTEN] += j - i
            i = j
        stats[S_BLOCKS] += 1
    stats[S_STATUS] = DONE
    return DONE


@functools.cache
def load_kernels() -> None:
    """Load the compiled loops now (from Numba's cache, or compiled on a first run: seconds) rather than inside a
    snapshot's pause or a restore."""
    from dirtylog.migration.payload.digest import MULTIPLIERS

    control = np.ones(CONTROL_SIZE, dtype=np.int64)  # stop at once: only the loading is wanted
    stats = np.zeros(STATS_SIZE, dtype=np.int64)
    held = np.zeros((1, 1), dtype=np.uint64)
    ranks = np.zeros((1, 2), dtype=np.int64)
    addresses = np.zeros(1, dtype=np.int64)
    checks = np.zeros((1, 1), dtype=np.uint64)
    checked = np.zeros((1, 1), dtype=np.uint8)
    memory = np.zeros((BLOCK, WORDS), dtype=np.uint64)
    words = np.zeros(1, dtype=np.uint64)
    rank_words(words, ranks[0])
    chunk_checks(words, words, ranks[0], MULTIPLIERS, words.copy())
    save_layer(-1, memory, words, ranks[0], -1, words.copy(), words.copy(), np.zeros(1, dtype=np.uint8), MULTIPLIERS,
               control, stats)
    serve_restore(-1, 0, held, ranks, addresses, addresses, addresses, checks, checked, np.zeros(1, dtype=np.uint8),
                  MULTIPLIERS, control, stats)
    merge_layers(held, ranks, addresses, addresses, addresses, checks, checked, MULTIPLIERS, -1, words.copy(),
                 words.copy(), control, stats)
