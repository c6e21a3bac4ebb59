"""Dirty logging on real KVM, modelled on the kernel's ``dirty_log_perf_test``, plus our cost over the bare ioctls.

    python bench/dirty_log_perf.py                 # 2 vCPUs x 2 GiB, every mode, tables (5-6 minutes here)
    python bench/dirty_log_perf.py --json          # the same as one JSON object, raw samples included
    python bench/dirty_log_perf.py -m clear -b 1G -v 1 -i 5 -w 100 -a --densities 1,10

Flags as in the selftest where they make sense: ``-b`` bytes per vCPU, ``-v`` vCPUs, ``-i`` iterations,
``-w`` write percentage, ``-a`` random access, ``-x`` memory slots, ``-m`` mode (log, clear, ring, all).

Part 1, per mode, as the selftest does: one guest writer per vCPU over its own share of memory, held by the
host after every iteration (``Machine.on_iteration`` blocks the vCPU thread: the selftest's iteration
barrier). The first, sequential pass over all of memory is *populate*; then logging is enabled (timed), and
each of ``-i`` iterations dirties ``-w`` percent of every share (``-a``: random pages, else a sequential
sweep) and is followed by one ``collect()`` + ``pages()``, split into the GET / CLEAR ioctls (ring: the
harvest, i.e. all of collect but KVM_RESET_DIRTY_RINGS, and the reset) and the rest. Disabling is timed last.
Unlike the selftest the guest never reads: ``-w`` is the dirty fraction of an iteration, not a read/write mix.

Part 2, per mode and dirty fraction (``--densities``, default 1 % and 10 % random pages, 100 % sequential),
on the same guest: the *bare* collection, i.e. the raw ioctls (``dirtylog.kvm.ioctl`` and ``abi`` structs,
buffers allocated once) and the plain conversion ``np.flatnonzero(np.unpackbits(bitmap, bitorder="little"))``
(ring: a whole-ring NumPy read of the DIRTY entries, marked RESET, KVM_RESET_DIRTY_RINGS, ``np.sort`` and drop repeats),
against our ``tracker.collect().pages()``. Bare and ours alternate, each after one guest iteration dirtying
the same fraction; the table gives medians and ours/bare of the medians, by wall time and by this thread's
CPU time (which a busy neighbour on the shared cores cannot inflate). Goal: ours/bare <= 1.15.

Part 3: ``DirtyBitmap.runs()`` on a 64 GiB-equivalent bitmap (16,777,216 pages, 10 % random; goal < 10 ms).

Random pages are written with repeats, so a random iteration writes ``-ln(1 - f)`` times the share to
dirty a fraction ``f`` of it on average; 100 % cannot be reached that way and always runs sequentially.
The pages actually reported are printed. A 100 % iteration of 4 GiB takes ~11 s of guest time on these PVM
machines (a write-protect fault costs ~20 us), which is why part 1 defaults to ``-w 10`` and part 2 takes
fewer samples at 100 % (``--full-repeat``). Compare ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import numpy as np
from bitmap import bench_case  # bench/bitmap.py: this folder is on sys.path when run as a script
from numpy.typing import NDArray

from dirtylog.bitmap import DirtyBitmap
from dirtylog.guest.asm import R8, R9, R10, R11, R12, R13, R14, R15, RAX, RBX, RDI, RDX, Assembler, Mem
from dirtylog.guest.machine import DEFAULT_RING_ENTRIES
from dirtylog.guest.programs import ControlBlock, GuestProgram, Port, xorshift
from dirtylog.guest.x86 import CODE_ADDR, control_block_addr
from dirtylog.kvm import abi
from dirtylog.kvm.ioctl import ioctl
from dirtylog.kvm.system import Vm
from dirtylog.machine import TRACKING_MODES, Machine, TrackingMode
from dirtylog.tracking.base import Tracker
from dirtylog.tracking.kvm_ring import RingTracker
from dirtylog.units import parse_size

GOAL_RATIO = 1.15
GOAL_RUNS_MS = 10.0
DENSITIES = (0.01, 0.10, 1.0)
RUNS_DENSITY = 0.10
BARRIER_TIMEOUT = 120.0

# The bench's guest program reads one control-block field the library's programs do not use.
ACCESS_FIELD = 96  # 0: sequential sweep, otherwise random pages

T = TypeVar("T")


# --------------------------------------------------------------------------------------------------------
# the guest: W writes per iteration, sequential or random, then a call to the host


def writer_program() -> GuestProgram:
    """Each iteration writes WRITES_PER_ITERATION pages of the vCPU's share and reports to the host.

    Sequential iterations sweep the share from where the last one stopped (wrapping), so ``W`` writes
    dirty ``W`` distinct pages; random ones pick pages uniformly (xorshift64), with repeats. The access
    kind and ``W`` are reread at the start of each iteration, so the host may change them at the barrier.
    """
    a = Assembler()
    a.mov(R15, RDI)
    a.mov(RBX, Mem(R15, ControlBlock.AREA_BASE))
    a.mov(R12, Mem(R15, ControlBlock.AREA_NPAGES))
    a.mov(R11, Mem(R15, ControlBlock.PRNG_SEED))
    a.mov(R10, Mem(R15, ControlBlock.PROGRESS))
    a.mov(R9, Mem(R15, ControlBlock.ITERATION))
    a.inc(R9)
    a.mov_imm(R13, 0)  # sweep cursor, a page index in the share
    a.label("iteration")
    a.mov(R8, Mem(R15, ControlBlock.WRITES_PER_ITERATION))
    a.mov(R14, Mem(R15, ACCESS_FIELD))
    a.label("next")
    a.test(R14, R14)
    a.jz("sequential")
    xorshift(a)
    a.mov(RAX, R11)
    a.mul(R12)  # RDX = R11 * pages >> 64: a uniform page index without division
    a.mov(RAX, RDX)
    a.jmp("address")
    a.label("sequential")
    a.mov(RAX, R13)
    a.inc(R13)
    a.cmp(R13, R12)
    a.jb("address")
    a.mov_imm(R13, 0)
    a.label("address")
    a.shl(RAX, 12)
    a.add(RAX, RBX)
    a.mov(Mem(RAX), R9)
    a.inc(R10)
    a.dec(R8)
    a.jnz("next")
    a.mov(Mem(R15, ControlBlock.PROGRESS), R10)
    a.mov(Mem(R15, ControlBlock.ITERATION), R9)
    a.inc(R9)
    a.mov_imm(RDX, Port.ITERATION)
    a.out_dx_al()
    a.jmp("iteration")
    return GuestProgram("dirty_log_perf", a.assemble(CODE_ADDR))


def writes_for(fraction: float, share: int, random: bool) -> tuple[int, bool]:
    """Writes per iteration to dirty ``fraction`` of a share, and whether they can be random."""
    if not random or fraction >= 1.0:
        return max(1, round(fraction * share)), False
    return max(1, round(-math.log1p(-fraction) * share)), True


class IterationBarrier:
    """The selftest's per-iteration handshake: a vCPU that finished an iteration waits to be released."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        count = machine.spec.vcpus
        self._arrived = [threading.Event() for _ in range(count)]
        self._go = [threading.Event() for _ in range(count)]
        self.finished_at = [0.0] * count
        self._open = False
        machine.on_iteration = self._on_iteration

    def _on_iteration(self, vcpu: int, iteration: int) -> None:  # on the vCPU's thread
        self.finished_at[vcpu] = time.perf_counter()
        self._arrived[vcpu].set()
        if not self._open:
            self._go[vcpu].wait()
            self._go[vcpu].clear()

    def wait(self) -> None:
        """Until every vCPU has finished its iteration and is held."""
        deadline = time.monotonic() + BARRIER_TIMEOUT
        for arrived in self._arrived:
            while not arrived.wait(0.1):
                self.machine.check()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"vCPUs did not finish an iteration within {BARRIER_TIMEOUT} s")
            arrived.clear()

    def set_next(self, fraction: float, random: bool) -> tuple[int, bool]:
        """Shape the next iteration of every vCPU (while they are held); returns (writes of vCPU 0, random)."""
        words = self.machine.ram.words  # direct, untracked stores: the guest dirties this page itself
        first: tuple[int, bool] = (0, False)
        for vcpu in range(self.machine.spec.vcpus):
            writes, rand = writes_for(fraction, len(self.machine.spec.share(vcpu)), random)
            block = control_block_addr(vcpu) // 8
            words[block + ControlBlock.WRITES_PER_ITERATION // 8] = writes
            words[block + ACCESS_FIELD // 8] = int(rand)
            if vcpu == 0:
                first = (writes, rand)
        return first

    def iterate(self) -> float:
        """Release the vCPUs for one iteration and wait for it: seconds until the last one finished."""
        start = time.perf_counter()
        for go in self._go:
            go.set()
        self.wait()
        return max(self.finished_at) - start

    def open(self) -> None:
        """Stop holding vCPUs (before the machine stops)."""
        self._open = True
        for go in self._go:
            go.set()


# --------------------------------------------------------------------------------------------------------
# bare collections: the ioctls and the plain NumPy conversion, nothing else


class BareBitmap:
    """KVM_GET_DIRTY_LOG per slot (+ KVM_CLEAR_DIRTY_LOG of the whole slot), then unpack + flatnonzero."""

    def __init__(self, vm: Vm, slots: Sequence[int], clear: bool) -> None:
        self.fd = vm.fd
        self.clear = clear
        self.slots = []
        for slot in slots:
            memslot = vm.slots[slot]
            buffer = np.zeros(memslot.bitmap_bytes // 8, dtype=np.uint64)
            get = abi.kvm_dirty_log(slot=slot, dirty_bitmap=buffer.ctypes.data)
            clr = abi.kvm_clear_dirty_log(slot=slot, num_pages=memslot.npages, first_page=0,
                                          dirty_bitmap=buffer.ctypes.data)
            self.slots.append((memslot.base_gfn, buffer, get, clr))

    def collect(self) -> tuple[NDArray[Any], float]:
        """Dirty guest page numbers and the seconds spent in ioctls."""
        parts = []
        ioctl_seconds = 0.0
        for base_gfn, buffer, get, clr in self.slots:
            start = time.perf_counter()
            ioctl(self.fd, abi.KVM_GET_DIRTY_LOG, get)
            if self.clear:
                ioctl(self.fd, abi.KVM_CLEAR_DIRTY_LOG, clr)
            ioctl_seconds += time.perf_counter() - start
            pages = np.flatnonzero(np.unpackbits(buffer.view(np.uint8), bitorder="little"))
            parts.append(pages + base_gfn if base_gfn else pages)
        return (parts[0] if len(parts) == 1 else np.concatenate(parts)), ioctl_seconds


def sorted_distinct(gfns: NDArray[np.uint64]) -> NDArray[np.uint64]:
    """Sorted pages without repeats (a page written again after a ring-full reset is in the ring twice).

    Not ``np.unique``: NumPy 2.4 hashes integer arrays there, ~450 ns per element here (450 ms for 1 M).
    """
    pages = np.sort(gfns)
    if pages.size > 1:
        keep = np.empty(pages.size, dtype=np.bool_)
        keep[0] = True
        np.not_equal(pages[1:], pages[:-1], out=keep[1:])
        pages = pages[keep]
    return pages


class BareRing:
    """Every DIRTY entry of every ring read with NumPy and marked RESET, KVM_RESET_DIRTY_RINGS, sort.

    Ring-full exits while the guest runs are served the same way and their pages kept for the collection.
    The tracker harvests the same rings in order from its fetch index, so after a bare collection the
    bench moves that index past what the bare harvest took (:meth:`sync`).
    """

    def __init__(self, machine: Machine, tracker: RingTracker) -> None:
        self.fd = machine.vm.fd
        self.tracker = tracker
        self.rings = [(vcpu.id, vcpu.dirty_ring) for vcpu in machine.vcpus if vcpu.dirty_ring is not None]
        self.slot_base = np.zeros(max(machine.vm.slots) + 1, dtype=np.uint64)
        for memslot in machine.vm.slots.values():
            self.slot_base[memslot.slot] = memslot.base_gfn
        self.kept: list[NDArray[np.uint64]] = []
        self.taken = dict.fromkeys((vcpu_id for vcpu_id, _ in self.rings), 0)
        self.ring_full_exits = 0
        self.lock = threading.Lock()

    def _harvest(self) -> NDArray[np.uint64]:
        parts = []
        for vcpu_id, ring in self.rings:
            flags = ring["flags"]
            dirty = np.flatnonzero(flags & abi.KVM_DIRTY_GFN_F_DIRTY)
            entries = ring[dirty]
            parts.append(self.slot_base[entries["slot"] & 0xFFFF] + entries["offset"])
            flags[dirty] = abi.KVM_DIRTY_GFN_F_RESET
            self.taken[vcpu_id] += dirty.size
        return np.concatenate(parts)

    def on_ring_full(self, vcpu: int) -> None:  # on the full vCPU's thread
        with self.lock:
            self.ring_full_exits += 1
            self.kept.append(self._harvest())
            ioctl(self.fd, abi.KVM_RESET_DIRTY_RINGS)

    def collect(self) -> tuple[NDArray[Any], float]:
        with self.lock:
            gfns = self._harvest()
            start = time.perf_counter()
            ioctl(self.fd, abi.KVM_RESET_DIRTY_RINGS)
            ioctl_seconds = time.perf_counter() - start
            if self.kept:
                gfns = np.concatenate([*self.kept, gfns])
                self.kept.clear()
        return sorted_distinct(gfns), ioctl_seconds

    def sync(self) -> None:
        """Move the tracker's fetch index past the entries this harvester took."""
        fetch = self.tracker._fetch  # the one coupling: both read the same rings
        for vcpu_id, count in self.taken.items():
            fetch[vcpu_id] = (fetch.get(vcpu_id, 0) + count) % self.tracker.entries
            self.taken[vcpu_id] = 0


# --------------------------------------------------------------------------------------------------------
# timing our tracker's ioctls in part 1


class IoctlClock:
    """Seconds the tracker spends in the dirty-log ioctls, by wrapping the VM's methods for a while."""

    NAMES = ("get_dirty_log", "clear_dirty_log", "reset_dirty_rings")

    def __init__(self, vm: Vm) -> None:
        self.vm = vm
        self.seconds = dict.fromkeys(self.NAMES, 0.0)

    def _wrap(self, name: str) -> Callable[..., Any]:
        original: Callable[..., Any] = getattr(self.vm, name)

        def timed(*args: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args)
            finally:
                self.seconds[name] += time.perf_counter() - start

        return timed

    def __enter__(self) -> IoctlClock:
        for name in self.NAMES:
            setattr(self.vm, name, self._wrap(name))
        return self

    def __exit__(self, *exc: object) -> None:
        for name in self.NAMES:
            delattr(self.vm, name)

    def take(self) -> dict[str, float]:
        taken, self.seconds = self.seconds, dict.fromkeys(self.NAMES, 0.0)
        return taken


# --------------------------------------------------------------------------------------------------------
# results


@dataclass
class Iteration:
    iteration: int
    dirty_s: float  # release until the last vCPU finished writing
    pages: int  # pages the collection reported
    get_ms: float  # KVM_GET_DIRTY_LOG ioctls (ring: harvest, i.e. collect minus the reset)
    clear_ms: float  # KVM_CLEAR_DIRTY_LOG ioctls (ring: KVM_RESET_DIRTY_RINGS)
    collect_ms: float  # all of collect()
    pages_ms: float  # DirtyBitmap.pages()
    ring_full_exits: int = 0


@dataclass
class Comparison:
    density: float
    access: str
    writes_per_vcpu: int
    pages: int  # median pages per collection of ours
    bare_pages: int  # and of bare: the same up to random variation, else one of them is wrong
    achieved: float  # pages / workload pages
    dirty_s: float  # guest time of the iteration before a collection (write-protect faults, ring-full exits)
    bare_ms: float
    bare_ioctl_ms: float
    bare_convert_ms: float
    ours_ms: float
    ours_collect_ms: float
    ours_pages_ms: float
    ratio: float  # ours_ms / bare_ms
    cpu_ratio: float  # the same with this thread's CPU time, immune to preemption by other processes
    ring_full_exits: float = 0.0  # per guest iteration, median
    samples_ms: dict[str, list[float]] = field(default_factory=dict)  # bare and ours, in the order taken
    page_faults: dict[str, list[int]] = field(default_factory=dict)  # minor faults of each sample


@dataclass
class ModeResult:
    mode: str
    populate_s: float
    enable_ms: float
    disable_ms: float
    iterations: list[Iteration] = field(default_factory=list)
    comparison: list[Comparison] = field(default_factory=list)


def ms(seconds: float) -> float:
    return seconds * 1e3


# --------------------------------------------------------------------------------------------------------
# the runs


def run_mode(mode: TrackingMode, args: argparse.Namespace) -> ModeResult:
    memory = args.vcpus * args.bytes_per_vcpu
    with Machine(memory, vcpus=args.vcpus, workload="stamp", slots=args.slots, prefault=True,
                 program=writer_program()) as machine:
        area = len(machine.workload_pages)
        tracker = machine.dirty_log(mode, initially_set=args.initially_set, ring_entries=args.ring_entries)
        barrier = IterationBarrier(machine)
        try:
            # Populate: the control blocks say "a whole share, sequential" until the first barrier.
            start = time.perf_counter()
            machine.start()
            barrier.wait()
            populate = time.perf_counter() - start

            tracker.enable()
            result = ModeResult(mode, populate, ms(tracker.stats.enable_seconds), 0.0)
            ring = tracker if isinstance(tracker, RingTracker) else None
            with IoctlClock(machine.vm) as clock:
                barrier.set_next(args.write_percent / 100, args.random_access)
                for number in range(1, args.iterations + 1):
                    exits = ring.ring_full_exits if ring else 0
                    dirty = barrier.iterate()
                    clock.take()
                    start = time.perf_counter()
                    bitmap = tracker.collect()
                    collected = time.perf_counter()
                    pages = bitmap.pages()
                    done = time.perf_counter()
                    spent = clock.take()
                    collect_s = collected - start
                    if ring:
                        get_s, clear_s = collect_s - spent["reset_dirty_rings"], spent["reset_dirty_rings"]
                    else:
                        get_s, clear_s = spent["get_dirty_log"], spent["clear_dirty_log"]
                    result.iterations.append(Iteration(
                        number, dirty, int(pages.size), ms(get_s), ms(clear_s), ms(collect_s), ms(done - collected),
                        (ring.ring_full_exits - exits) if ring else 0))
            for density in args.densities:
                repeat = args.full_repeat if density >= 1.0 else args.repeat
                result.comparison.append(compare(machine, tracker, barrier, density, repeat, area))
            tracker.disable()
            result.disable_ms = ms(tracker.stats.disable_seconds)
            return result
        finally:
            tracker.disable()
            barrier.open()


def minor_faults() -> int:
    """Page faults of this thread so far (each costs ~3.5 us on these PVM machines)."""
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt


def timed(fn: Callable[[], T]) -> tuple[T, float, float]:
    """``fn()``, its wall time and the CPU time of this thread (which a busy neighbour cannot inflate)."""
    wall, cpu = time.perf_counter(), time.thread_time()
    result = fn()
    return result, time.perf_counter() - wall, time.thread_time() - cpu


def warm_allocator(npages: int, first: int, density: float) -> None:
    """Run both sides' conversions a few times on a synthetic bitmap shaped like the coming collections.

    A fresh process pays a page fault (~3.5 us here, PVM) for every page of NumPy's large temporaries
    until glibc's malloc has raised its mmap and trim thresholds to their size; a long-running collector
    does not, and neither should the comparison.
    """
    bits = np.zeros(npages, dtype=np.bool_)
    if density >= 1.0:
        bits[first:] = True
    else:
        bits[first:] = np.random.default_rng(7).random(npages - first) < density
    bitmap = DirtyBitmap(np.packbits(bits, bitorder="little").view(np.uint64), npages)
    for _ in range(3):
        pages = bitmap.pages()  # ours
        np.flatnonzero(np.unpackbits(bitmap.words.view(np.uint8), bitorder="little"))  # bare, bitmap modes
        DirtyBitmap.empty(npages).set_pages(pages)  # ours, ring mode
        sorted_distinct(pages[::-1])  # bare, ring mode


def compare(machine: Machine, tracker: Tracker, barrier: IterationBarrier, density: float, repeat: int,
            area: int) -> Comparison:
    """Bare and ours, alternating, each after one iteration dirtying ``density`` of every share.

    The previous collection left nothing dirty, so no warm-up iteration is needed (a 100 % iteration takes
    seconds here): one collection of each with nothing dirty warms their code paths and buffers, and
    :func:`warm_allocator` the C allocator.
    """
    bare: BareBitmap | BareRing
    ring = tracker if isinstance(tracker, RingTracker) else None
    if ring:
        bare = BareRing(machine, ring)
        ours_ring_full = machine.on_dirty_ring_full
    else:
        bare = BareBitmap(machine.vm, tracker.slots, clear=tracker.mode == "clear")  # type: ignore[attr-defined]
    writes, random = barrier.set_next(density, random=True)
    warm_allocator(machine.ram.npages, machine.workload_pages.start, density)
    bare.collect()
    if isinstance(bare, BareRing):
        bare.sync()
    tracker.collect().pages()
    samples: dict[str, list[float]] = {}

    def add(**values: float) -> None:
        for key, value in values.items():
            samples.setdefault(key, []).append(value)

    try:
        for rep in range(repeat):
            for which in (("bare", "ours") if rep % 2 == 0 else ("ours", "bare")):
                if isinstance(bare, BareRing) and ring:
                    machine.on_dirty_ring_full = bare.on_ring_full if which == "bare" else ours_ring_full
                    before = bare.ring_full_exits + ring.ring_full_exits
                add(dirty=barrier.iterate())
                faults = minor_faults()
                if which == "bare":
                    (pages, ioctl_s), wall, cpu = timed(bare.collect)
                    add(bare=wall, bare_cpu=cpu, bare_ioctl=ioctl_s, bare_faults=minor_faults() - faults)
                    if isinstance(bare, BareRing):
                        bare.sync()
                else:
                    bitmap, collect_wall, collect_cpu = timed(tracker.collect)
                    pages, pages_wall, pages_cpu = timed(bitmap.pages)
                    add(ours=collect_wall + pages_wall, ours_cpu=collect_cpu + pages_cpu, ours_collect=collect_wall,
                        ours_pages=pages_wall, ours_faults=minor_faults() - faults)
                add(**{f"{which}_count": float(pages.size)})
                if isinstance(bare, BareRing) and ring:
                    add(exits=bare.ring_full_exits + ring.ring_full_exits - before)
    finally:
        if ring:
            machine.on_dirty_ring_full = ours_ring_full
    med = {key: statistics.median(values) for key, values in samples.items()}
    return Comparison(
        density, "random" if random else "sequential", writes, int(med["ours_count"]), int(med["bare_count"]),
        med["ours_count"] / area,
        med["dirty"], ms(med["bare"]), ms(med["bare_ioctl"]), ms(med["bare"] - med["bare_ioctl"]),
        ms(med["ours"]), ms(med["ours_collect"]), ms(med["ours_pages"]), med["ours"] / med["bare"],
        med["ours_cpu"] / med["bare_cpu"], med.get("exits", 0.0),
        {key: [round(ms(value), 3) for value in samples[key]] for key in ("bare", "ours", "bare_cpu", "ours_cpu")},
        {key: [int(value) for value in samples[f"{key}_faults"]] for key in ("bare", "ours")})


def conversion(repeat: int) -> dict[str, float]:
    """Bitmap -> runs on a 64 GiB-equivalent bitmap at 10 % random dirty pages (no KVM involved), measured
    by bench/bitmap.py's own case."""
    row = bench_case("64G", RUNS_DENSITY, "random", repeat, np.random.default_rng(3))
    return {"npages": row.npages, "dirty": row.dirty, "runs": row.runs, "runs_ms": row.runs_ms,
            "pages_ms": row.pages_ms, "bare_pages_ms": row.baseline_ms}


# --------------------------------------------------------------------------------------------------------
# output


def print_table(results: dict[str, Any]) -> None:
    p = results["params"]
    print(f"dirty_log_perf: {p['vcpus']} vCPUs x {p['bytes_per_vcpu'] >> 20} MiB, {p['slots']} slot(s), "
          f"-w {p['write_percent']}{' -a' if p['random_access'] else ''}, {p['iterations']} iterations, "
          f"{p['repeat']} samples per comparison ({p['full_repeat']} at 100 %); ring {p['ring_entries']} entries; "
          f"load {results['load_before']} -> {results['load_after']}")
    for r in results["modes"]:
        print(f"\n== {r['mode']} ==  populate {r['populate_s']:.3f} s   enable {r['enable_ms']:.2f} ms   "
              f"disable {r['disable_ms']:.2f} ms")
        get, clear = ("harvest", "reset") if r["mode"] == "ring" else ("get", "clear")
        print(f"{'iter':>4} {'dirty s':>8} {'pages':>9} {get + ' ms':>10} {clear + ' ms':>9} "
              f"{'collect ms':>10} {'pages() ms':>10}{'  ring-full' if r['mode'] == 'ring' else ''}")
        for it in r["iterations"]:
            print(f"{it['iteration']:>4} {it['dirty_s']:>8.3f} {it['pages']:>9} {it['get_ms']:>10.2f} "
                  f"{it['clear_ms']:>9.2f} {it['collect_ms']:>10.2f} {it['pages_ms']:>10.2f}"
                  + (f"  {it['ring_full_exits']:>9}" if r["mode"] == "ring" else ""))
    print(f"\nours = collect().pages(); bare = raw ioctls + np.flatnonzero(np.unpackbits(...)) (ring: NumPy harvest "
          f"+ reset + sort); medians in ms; goal ours/bare <= {GOAL_RATIO}; cpu = this thread's CPU time")
    print(f"{'mode':>5} {'dirty':>5} {'access':>10} {'pages':>8} {'guest s':>7} {'bare':>6} {'=ioctl':>6} "
          f"{'+conv':>6} {'ours':>6} {'=coll.':>6} {'+pages':>6} {'ours/bare':>9} {'cpu':>6} {'ring-full':>9}")
    for mode in results["modes"]:
        for c in mode["comparison"]:
            verdict = "ok" if c["ratio"] <= GOAL_RATIO else "MISS"
            print(f"{mode['mode']:>5} {c['density']:>5.0%} {c['access']:>10} {c['pages']:>8} {c['dirty_s']:>7.2f} "
                  f"{c['bare_ms']:>6.2f} {c['bare_ioctl_ms']:>6.2f} {c['bare_convert_ms']:>6.2f} "
                  f"{c['ours_ms']:>6.2f} {c['ours_collect_ms']:>6.2f} {c['ours_pages_ms']:>6.2f} "
                  f"{c['ratio']:>8.2f}x {c['cpu_ratio']:>5.2f}x {c['ring_full_exits']:>9.0f}  {verdict}")
    conv = results.get("conversion")
    if conv:
        verdict = "ok" if conv["runs_ms"] < GOAL_RUNS_MS else "MISS"
        print(f"\n64 GiB-equivalent bitmap ({conv['npages']:,} pages, {conv['dirty']:,} dirty = 10 % random, "
              f"{conv['runs']:,} runs): runs() {conv['runs_ms']:.2f} ms (goal < {GOAL_RUNS_MS:.0f} ms: {verdict}); "
              f"pages() {conv['pages_ms']:.2f} ms; bare unpack+flatnonzero {conv['bare_pages_ms']:.2f} ms")


def load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-b", "--bytes-per-vcpu", type=parse_size, default=parse_size("2G"),
                        help="guest memory per vCPU (the selftest's -b; default 2G: 4 GiB with 2 vCPUs)")
    parser.add_argument("-v", "--vcpus", type=int, default=2, help="vCPUs, each writing its own share (default 2)")
    parser.add_argument("-i", "--iterations", type=int, default=3, help="part-1 iterations (default 3)")
    parser.add_argument("-w", "--write-percent", type=int, default=10,
                        help="percent of each share dirtied per part-1 iteration (default 10; the selftest's "
                        "100 costs ~10 s per iteration on PVM here, and part 2 measures 100 %% anyway)")
    parser.add_argument("-a", "--random-access", action="store_true",
                        help="part 1 writes random pages instead of a sequential sweep")
    parser.add_argument("-m", "--mode", choices=[*TRACKING_MODES, "all"], default="all")
    parser.add_argument("-x", "--slots", type=int, default=1, help="memory slots (the selftest's -x)")
    parser.add_argument("--no-initially-set", dest="initially_set", action="store_false",
                        help="clear mode without KVM_DIRTY_LOG_INITIALLY_SET (the selftest sets it when offered)")
    parser.add_argument("--ring-entries", type=int, default=DEFAULT_RING_ENTRIES,
                        help=f"dirty ring entries per vCPU (default {DEFAULT_RING_ENTRIES}, the tracker's; "
                        "65536 is the host maximum here)")
    parser.add_argument("--densities", type=lambda text: tuple(float(v) / 100 for v in text.split(",")),
                        default=DENSITIES, help="part-2 dirty percentages (default 1,10,100)")
    parser.add_argument("-r", "--repeat", type=int, default=7,
                        help="part-2 samples of bare and of ours below 100 %% dirty (default 7)")
    parser.add_argument("--full-repeat", type=int, default=3,
                        help="part-2 samples of bare and of ours at 100 %% dirty (default 3)")
    parser.add_argument("--no-conversion", dest="conversion", action="store_false", help="skip part 3")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of tables")
    args = parser.parse_args()
    if not 0 < args.write_percent <= 100:
        parser.error("-w must be in 1..100")
    if args.iterations < 1 or args.repeat < 1 or args.full_repeat < 1:
        parser.error("-i, -r and --full-repeat must be at least 1")

    modes: list[TrackingMode] = list(TRACKING_MODES) if args.mode == "all" else [args.mode]
    results: dict[str, Any] = {
        "command": " ".join(["python", "bench/dirty_log_perf.py", *sys.argv[1:]]),
        "params": {key: value for key, value in vars(args).items() if key not in ("json", "mode")},
        "load_before": load(),
    }
    results["modes"] = [asdict(run_mode(mode, args)) for mode in modes]
    if args.conversion:
        results["conversion"] = conversion(max(args.repeat, 5))
    results["load_after"] = load()
    results["goal_ratio"] = GOAL_RATIO
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_table(results)


if __name__ == "__main__":
    main()
