"""An interleaving checker for the dirty log: every schedule of collector and vCPU steps, two invariants.

Actors and their atomic steps
    vCPU v   writes its pages in program order. Each write is: an *access* (TLB lookup; on a miss a table
             walk that fills the TLB; the store retires or a stage-2 abort is taken), then, after an abort,
             the two halves of user_mem_abort as separate steps — install the mapping (stage2_set_pte) and
             mark_page_dirty — and a retried access.
    collector runs ``collections`` KVM_GET_DIRTY_LOG calls on the slot, one step per :class:`Op`. The last
             call starts only after every vCPU has finished, so by the end every write has had a chance to
             be reported.

Invariants
    lost write   a store is *covered* when a later copy_to_user reports its page (userspace reads the page
                 after the copy, so it sees the store). At the end no store may be uncovered.
    phantom      a reported page must have been accessed for writing since the start of the previous
                 call, or be the target of a write still in flight (faulted, not yet retired).

Reduction
    Steps of different vCPUs commute exactly: they touch different pages, TLB entries only their own
    vCPU ever fills, and bitmap words only by OR. While the collector waits for the vCPUs to finish
    before its final call nothing else can run, so there only the lowest unfinished vCPU is scheduled:
    every order of the remaining vCPU steps reaches the same state at the final call.

The machine keeps its state in the model's own objects and moves between states with their compact
``save``/``restore`` values, so exploration deduplicates on tuples of ints and shared table bytes.
"""

from __future__ import annotations

import random
import time
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Generic, Literal, TypeVar

from dirtylog.stage2.cpu import guest_access, vcpu_write
from dirtylog.stage2.dirty_log import GetDirtyLog, KvmDirtyLog, Op
from dirtylog.stage2.errors import Stage2Error
from dirtylog.stage2.kvm import kvm_create_vm, mark_page_dirty
from dirtylog.stage2.memslot import BITS_PER_LONG, KVM_MEM_LOG_DIRTY_PAGES, kvm_create_dirty_bitmap
from dirtylog.stage2.mmu import stage2_map_fault
from dirtylog.stage2.mutants import PATCH, Variant
from dirtylog.stage2.pgtable import PAGE_SHIFT, PAGE_SIZE, TablesSaved, desc_none, desc_writable
from dirtylog.stage2.regions import KvmUserspaceMemoryRegion, kvm_vm_ioctl_set_user_memory_region
from dirtylog.stage2.tlb import TlbSaved

Invariant = Literal["lost-write", "phantom"]
T = TypeVar("T")

# vCPU phases within one write.
_ACCESS, _FAULTED, _HALF_HANDLED, _RETRY = 0, 1, 2, 3
_USERSPACE_ADDR = 0x7F00_0000_0000


class CheckConfigError(Stage2Error, ValueError):
    """A checker configuration that cannot be explored."""


@dataclass(frozen=True)
class CheckConfig:
    """What to explore: ``vcpus`` writing ``writes`` pages each over a slot of ``pages`` pages, while
    ``collections`` KVM_GET_DIRTY_LOG calls run (the last after the vCPUs finish).

    vCPU v owns a contiguous share of the slot and alternates between the first and the last page of its
    share, so re-writes of a page race with write-protection and a share wider than 64 pages spans words.
    ``random_schedules`` > 0 samples that many random schedules instead of exploring all of them.
    """

    vcpus: int = 2
    pages: int = 128
    writes: int = 3
    collections: int = 2
    random_schedules: int = 0
    seed: int = 0
    max_states: int = 5_000_000

    def __post_init__(self) -> None:
        if self.vcpus < 1:
            raise CheckConfigError(f"the checker needs at least 1 vCPU, got {self.vcpus}")
        if self.pages < self.vcpus:
            raise CheckConfigError(f"{self.pages} pages cannot give each of {self.vcpus} vCPUs a page")
        if self.writes < 0:
            raise CheckConfigError(f"writes per vCPU must be 0 or more, got {self.writes}")
        if self.collections < 1:
            raise CheckConfigError(f"the checker needs at least 1 collection (the final one), got {self.collections}")
        if self.random_schedules < 0:
            raise CheckConfigError(f"random schedules must be 0 (exhaustive) or more, got {self.random_schedules}")

    def share(self, vcpu: int) -> range:
        """Pages vCPU ``vcpu`` owns."""
        per = self.pages // self.vcpus
        return range(vcpu * per, self.pages if vcpu == self.vcpus - 1 else (vcpu + 1) * per)

    def writes_of(self, vcpu: int) -> tuple[int, ...]:
        """The gfns vCPU ``vcpu`` writes, in order."""
        share = self.share(vcpu)
        return tuple(share[0] if j % 2 == 0 else share[-1] for j in range(self.writes))


@dataclass(frozen=True)
class TraceStep:
    """One line of a counterexample: who did what, and what it changed."""

    step: int
    actor: str
    action: str
    change: str


@dataclass(frozen=True)
class Counterexample:
    """A schedule that breaks an invariant, as a readable trace."""

    invariant: Invariant
    detail: str
    trace: tuple[TraceStep, ...]


@dataclass(frozen=True)
class CheckResult:
    """The verdict of one check and what it cost."""

    variant: str
    mode: Literal["exhaustive", "random"]
    config: CheckConfig
    states: int
    transitions: int
    seconds: float
    schedules: int
    counterexample: Counterexample | None = None
    complete: bool = True

    @property
    def ok(self) -> bool:
        """Whether both invariants held on everything explored."""
        return self.counterexample is None

    @property
    def states_per_second(self) -> float:
        """Distinct states explored per second of checking."""
        return self.states / self.seconds if self.seconds > 0 else float("inf")

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "verdict": "ok" if self.ok else "counterexample",
            "variant": self.variant,
            "mode": self.mode,
            "config": asdict(self.config),
            "states": self.states,
            "transitions": self.transitions,
            "schedules": self.schedules,
            "complete": self.complete,
            "seconds": round(self.seconds, 4),
            "states_per_second": round(self.states_per_second, 1),
            "counterexample": None if self.counterexample is None else asdict(self.counterexample),
        }


class _Interner(Generic[T]):
    """Hash-consing of one component's saved values: equal values get one small id.

    The model hands back the very same saved object while a component is unchanged, so the identity check
    makes the common case free; only a changed component is hashed.
    """

    def __init__(self) -> None:
        self.ids: dict[T, int] = {}
        self.values: list[T] = []
        self._last: object = None
        self._last_id = -1

    def __call__(self, value: T) -> int:
        if value is self._last:
            return self._last_id
        found = self.ids.get(value)
        if found is None:
            found = self.ids[value] = len(self.values)
            self.values.append(value)
        self._last, self._last_id = value, found
        return found


@dataclass
class _Violation:
    invariant: Invariant
    detail: str


@dataclass
class _Machine:
    """The model plus the checker's bookkeeping, movable between states by save/restore."""

    config: CheckConfig
    variant: Variant
    programs: tuple[tuple[int, ...], ...] = field(init=False)

    def __post_init__(self) -> None:
        config, variant = self.config, self.variant
        self.programs = tuple(config.writes_of(v) for v in range(config.vcpus))
        self.pages_of_interest = sorted({gfn for program in self.programs for gfn in program})
        self.kvm = kvm_create_vm(vmid=1, nr_vcpus=config.vcpus)
        region = KvmUserspaceMemoryRegion(0, 0, 0, config.pages * PAGE_SIZE, _USERSPACE_ADDR)
        memslot = kvm_vm_ioctl_set_user_memory_region(self.kvm, region)
        assert memslot is not None
        self.memslot = memslot
        # The guest ran before logging began: its pages are mapped writable and its TLBs remember that.
        for vcpu, program in zip(self.kvm.vcpus, self.programs, strict=True):
            for gfn in dict.fromkeys(program):
                vcpu_write(self.kvm, vcpu, gfn)
        if variant.initial_write_protect:
            kvm_vm_ioctl_set_user_memory_region(self.kvm, replace(region, flags=KVM_MEM_LOG_DIRTY_PAGES))
        else:
            memslot.flags |= KVM_MEM_LOG_DIRTY_PAGES
            kvm_create_dirty_bitmap(memslot)
        self.user_buffer = bytearray(8 * -(-config.pages // BITS_PER_LONG))
        self.collector = GetDirtyLog(self.kvm, KvmDirtyLog(0, self.user_buffer), variant.order)
        self.vstate = [0] * config.vcpus
        self._bitmap_len = len(memslot.dirty_bitmap or ())
        self._tables = _Interner[TablesSaved]()
        self._tlbs = [_Interner[TlbSaved]() for _ in range(config.vcpus)]
        self.collection = 0
        self.uncovered = 0
        self.touched_prev = 0
        self.touched_cur = 0

    # -- state as a value ---------------------------------------------------------------------------------
    def save(self) -> tuple[int, ...]:
        """The state as a flat tuple of ints: tables and TLBs by interned id, then everything else."""
        bitmap = self.memslot.dirty_bitmap
        assert bitmap is not None
        return (
            self._tables(self.kvm.pgt.save()),
            *(intern(vcpu.tlb.save()) for vcpu, intern in zip(self.kvm.vcpus, self._tlbs, strict=True)),
            *bitmap,
            *self.vstate,
            self.collection,
            *self.collector.save(),
            self.uncovered,
            self.touched_prev,
            self.touched_cur,
        )

    def restore(self, saved: tuple[int, ...]) -> None:
        """Move to a state from :meth:`save`."""
        nvcpus = len(self.vstate)
        self.kvm.pgt.restore(self._tables.values[saved[0]])
        for vcpu, intern, tlb_id in zip(self.kvm.vcpus, self._tlbs, saved[1 : 1 + nvcpus], strict=True):
            vcpu.tlb.restore(intern.values[tlb_id])
        at = 1 + nvcpus
        self.memslot.dirty_bitmap = list(saved[at : at + self._bitmap_len])
        at += self._bitmap_len
        self.vstate = list(saved[at : at + nvcpus])
        at += nvcpus
        self.collection = saved[at]
        self.collector.restore((saved[at + 1], bool(saved[at + 2]), saved[at + 3]))
        self.uncovered, self.touched_prev, self.touched_cur = saved[at + 4 : at + 7]

    # -- actions ------------------------------------------------------------------------------------------
    def enabled(self) -> list[int]:
        """Actions possible now: vCPU ids, and ``vcpus`` for the collector."""
        running = [v for v, program in enumerate(self.programs) if self.vstate[v] >> 2 < len(program)]
        final = self.config.collections - 1
        if self.collection < final:
            return [*running, self.config.vcpus]
        if running:
            return running[:1]
        return [self.config.vcpus] if self.collection == final else []

    def actor(self, action: int) -> str:
        return "collector" if action == self.config.vcpus else f"vcpu{action}"

    def apply(self, action: int, explain: bool = False) -> tuple[str, _Violation | None]:
        """Perform one atomic step; returns a description (when ``explain``) and any broken invariant."""
        if action == self.config.vcpus:
            return self._collector_step(explain)
        return self._vcpu_step(action, explain), None

    def _vcpu_step(self, v: int, explain: bool) -> str:
        pos, phase = self.vstate[v] >> 2, self.vstate[v] & 3
        gfn = self.programs[v][pos]
        vcpu = self.kvm.vcpus[v]
        if phase in (_ACCESS, _RETRY):
            entry = vcpu.tlb.lookup(self.kvm.vmid, gfn) if explain else None
            self.touched_cur |= 1 << gfn
            fault = guest_access(self.kvm, vcpu, gfn, write=True)
            if fault is None:
                self.uncovered |= 1 << gfn
                self.vstate[v] = (pos + 1) << 2
            else:
                self.vstate[v] = (pos << 2) | _FAULTED
            if not explain:
                return ""
            how = f"TLB hit ({'rw' if entry.writable else 'ro'})" if entry else "TLB miss, table walk"
            retry = "retry " if phase == _RETRY else ""
            outcome = "store retires" if fault is None else f"{fault.kind} fault -> user_mem_abort"
            return f"{retry}write gfn {gfn}: {how}: {outcome}"
        map_first = self.variant.fault_order == "map-then-mark"
        maps_now = phase == (_FAULTED if map_first else _HALF_HANDLED)
        if maps_now:
            resolution = stage2_map_fault(self.kvm, self.memslot, gfn << PAGE_SHIFT, write_fault=True)
            more = map_first and resolution.dirty_gfn is not None
            self.vstate[v] = (pos << 2) | (_HALF_HANDLED if more else _RETRY)
            kind = "stage2_set_pte" if resolution.level == 3 else "stage2_set_pmd_huge"
            return f"user_mem_abort: {kind}(gfn {gfn}, {'rw' if resolution.writable else 'ro'})" if explain else ""
        mark_page_dirty(self.kvm, gfn)
        self.vstate[v] = (pos << 2) | (_RETRY if map_first else _HALF_HANDLED)
        return f"user_mem_abort: mark_page_dirty(gfn {gfn})" if explain else ""

    def _collector_step(self, explain: bool) -> tuple[str, _Violation | None]:
        collector = self.collector
        number = self.collection + 1
        if collector.pc == 0:
            self.touched_prev, self.touched_cur = self.touched_cur, 0
        step = collector.step()
        violation = None
        if step.op is Op.COPY_TO_USER:
            reported = 0
            for i, word in enumerate(collector.buffer_words()):
                reported |= word << (i * BITS_PER_LONG)
            justified = self.touched_prev | self.touched_cur | self._in_flight()
            if reported & ~justified:
                pages = _gfns(reported & ~justified)
                violation = _Violation(
                    "phantom",
                    f"collection {self.collection + 1} reported gfn {pages} with no write to it since the "
                    f"previous collection began and none in flight",
                )
            self.uncovered &= ~reported
        if collector.done:
            self.collection += 1
            collector.restore((0, False, 0))
        if not explain:
            return "", violation
        text = step.op.value
        if step.word >= 0:
            text = text.replace("[i]", f"[{step.word}]").replace("i * 64", str(step.word * BITS_PER_LONG))
        if collector.continued:
            text = f"dirty_bitmap[{step.word}] is 0: continue"
        return f"get_dirty_log #{number}: {text}", violation

    def _in_flight(self) -> int:
        pages = 0
        for v, program in enumerate(self.programs):
            pos, phase = self.vstate[v] >> 2, self.vstate[v] & 3
            if phase != _ACCESS and pos < len(program):
                pages |= 1 << program[pos]
        return pages

    def final_violation(self) -> _Violation | None:
        """At a terminal state: any store no collection reported."""
        if not self.uncovered:
            return None
        return _Violation(
            "lost-write",
            f"gfn {_gfns(self.uncovered)} written but never reported, though a final collection ran "
            f"after every vCPU finished",
        )

    # -- people -------------------------------------------------------------------------------------------
    def view(self) -> dict[str, str]:
        """The parts of the state a trace shows, rendered."""
        bitmap = self.memslot.dirty_bitmap
        assert bitmap is not None
        nwords = len(bitmap) // 2
        out = {}
        for i in range(nwords):
            out[f"dirty_bitmap[{i}]"] = _render_word(bitmap[i], i)
            out[f"buffer[{i}]"] = _render_word(bitmap[nwords + i], i)
        for gfn in self.pages_of_interest:
            desc = self.kvm.pgt.walk(gfn << PAGE_SHIFT).desc
            out[f"pte({gfn})"] = "none" if desc_none(desc) else ("rw" if desc_writable(desc) else "ro")
            for vcpu in self.kvm.vcpus:
                entry = vcpu.tlb.lookup(self.kvm.vmid, gfn)
                out[f"tlb{vcpu.vcpu_id}({gfn})"] = "-" if entry is None else ("rw" if entry.writable else "ro")
        out["unreported"] = _gfns(self.uncovered)
        return out


def _gfns(mask: int, base: int = 0) -> str:
    """The set bits of ``mask`` as a sorted set of gfns, e.g. ``{0, 63}``."""
    return "{" + ", ".join(str(base + bit) for bit in range(mask.bit_length()) if mask >> bit & 1) + "}"


def _render_word(word: int, index: int) -> str:
    return _gfns(word, index * BITS_PER_LONG)


def _trace(config: CheckConfig, variant: Variant, actions: list[int]) -> tuple[TraceStep, ...]:
    machine = _Machine(config, variant)
    steps = []
    before = machine.view()
    for number, action in enumerate(actions, start=1):
        text, _ = machine.apply(action, explain=True)
        after = machine.view()
        change = "; ".join(f"{key}: {before[key]} -> {after[key]}" for key in after if after[key] != before[key])
        steps.append(TraceStep(number, machine.actor(action), text, change or "-"))
        before = after
    return tuple(steps)


_Parents = dict[tuple[int, ...], tuple[tuple[int, ...] | None, int]]


def _path(parents: _Parents, key: tuple[int, ...]) -> list[int]:
    """The actions leading from the initial state to ``key``."""
    actions: list[int] = []
    here: tuple[int, ...] | None = key
    while here is not None:
        here, action = parents[here]
        if action >= 0:
            actions.append(action)
    return actions[::-1]


def check(config: CheckConfig | None = None, variant: Variant = PATCH) -> CheckResult:
    """Explore every interleaving (or ``config.random_schedules`` random ones) and return the verdict."""
    config = config or CheckConfig()
    if config.random_schedules:
        return _check_random(config, variant)
    return _check_exhaustive(config, variant)


def _check_exhaustive(config: CheckConfig, variant: Variant) -> CheckResult:
    start = time.perf_counter()
    machine = _Machine(config, variant)
    initial = machine.save()
    parents: _Parents = {initial: (None, -1)}
    frontier: deque[tuple[int, ...]] = deque([initial])
    transitions = terminals = 0
    found: tuple[_Violation, list[int]] | None = None
    complete = True
    while frontier and found is None:
        key = frontier.popleft()
        machine.restore(key)
        actions = machine.enabled()
        if not actions:
            terminals += 1
            violation = machine.final_violation()
            if violation is not None:
                found = (violation, _path(parents, key))
            continue
        for index, action in enumerate(actions):
            if index:
                machine.restore(key)
            _, violation = machine.apply(action)
            transitions += 1
            successor = machine.save()
            if successor not in parents:
                parents[successor] = (key, action)
                frontier.append(successor)
            if violation is not None:
                found = (violation, [*_path(parents, key), action])
                break
        if len(parents) >= config.max_states:
            complete = False
            break
    return _result(config, variant, "exhaustive", start, len(parents), transitions, terminals, found, complete)


def _check_random(config: CheckConfig, variant: Variant) -> CheckResult:
    start = time.perf_counter()
    machine = _Machine(config, variant)
    initial = machine.save()
    seen: set[int] = {hash(initial)}
    transitions = 0
    found: tuple[_Violation, list[int]] | None = None
    schedules = 0
    for schedule in range(config.random_schedules):
        rng = random.Random(config.seed * 1_000_003 + schedule)
        machine.restore(initial)
        taken: list[int] = []
        schedules += 1
        while found is None:
            actions = machine.enabled()
            if not actions:
                violation = machine.final_violation()
                if violation is not None:
                    found = (violation, taken)
                break
            action = rng.choice(actions)
            _, violation = machine.apply(action)
            taken.append(action)
            transitions += 1
            seen.add(hash(machine.save()))
            if violation is not None:
                found = (violation, taken)
        if found is not None:
            break
    return _result(config, variant, "random", start, len(seen), transitions, schedules, found, True)


def _result(config: CheckConfig, variant: Variant, mode: Literal["exhaustive", "random"], start: float,
            states: int, transitions: int, schedules: int, found: tuple[_Violation, list[int]] | None,
            complete: bool) -> CheckResult:
    """The result of a search, with the counterexample's readable trace if one was found."""
    counterexample = None
    if found is not None:
        violation, actions = found
        counterexample = Counterexample(violation.invariant, violation.detail, _trace(config, variant, actions))
    return CheckResult(variant=variant.name, mode=mode, config=config, states=states, transitions=transitions,
                       seconds=time.perf_counter() - start, schedules=schedules, counterexample=counterexample,
                       complete=complete)
