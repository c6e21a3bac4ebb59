"""One schedule of guest writes and collections, run on the stage-2 model and on the real arm64 kernel.

The guest is the ``batch`` program (:mod:`dirtylog.guest.programs_arm64`): it writes exactly the pages the
host lists, so its accesses are known to the page and the model can replay them, instruction fetches and
control-block accesses included. The schedule starts with the guest touching one page of every 2 MiB
block before logging (so a huge-page-backed slot is mapped with blocks), switches logging on, then
alternates batches of writes and ``KVM_GET_DIRTY_LOG``.

On the kernel side every phase is also counted with ftrace (:mod:`dirtylog.lab.ftrace`); on the model side
the same phases are counted by the model's own functions (``Kvm.stat``). :func:`compare` puts the two side
by side: the dirty sets must be equal; the counts show where the kernel's code departs from the 2014 patch
(docs/stage2-model.md, "The model against the kernel").
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dirtylog.guest.arch import MAX_BATCH_PAGES, ControlBlock
from dirtylog.guest.arm64 import CODE_ADDR, Arm64
from dirtylog.guest.machine import Machine
from dirtylog.kvm import abi
from dirtylog.lab.errors import LabError
from dirtylog.lab.ftrace import FunctionCounter
from dirtylog.stage2.cpu import vcpu_read, vcpu_write
from dirtylog.stage2.dirty_log import KvmDirtyLog, kvm_vm_ioctl_get_dirty_log
from dirtylog.stage2.kvm import kvm_create_vm
from dirtylog.stage2.memslot import KVM_MEM_LOG_DIRTY_PAGES, kvm_dirty_bitmap_bytes
from dirtylog.stage2.regions import KvmUserspaceMemoryRegion, kvm_vm_ioctl_set_user_memory_region
from dirtylog.units import PAGE_SIZE

MEMORY = 32 << 20
BLOCK_PAGES = 512

#: What the model counts, and the kernel functions that do the same work (the first one ftrace can see).
COUNTS: list[tuple[str, str, tuple[str, ...]]] = [
    ("stage-2 faults on RAM", "user_mem_abort", ("user_mem_abort",)),
    ("pages logged", "mark_page_dirty", ("mark_page_dirty_in_slot",)),
    ("bitmap words re-protected", "kvm_mmu_write_protect_pt_masked",
     ("kvm_arch_mmu_enable_log_dirty_pt_masked", "kvm_mmu_write_protect_pt_masked")),
    ("write-protect walks", "stage2_wp_range", ("kvm_pgtable_stage2_wrprotect",)),
    ("VM-wide TLB flushes", "kvm_tlb_flush_vmid", ("kvm_flush_remote_tlbs", "kvm_arch_flush_remote_tlbs")),
    ("per-IPA TLB flushes", "kvm_tlb_flush_vmid_ipa", ("__kvm_tlb_flush_vmid_ipa",)),
    ("blocks dissolved", "stage2_dissolve_pmd", ()),
]
#: Kernel functions counted for the record, with no model counterpart.
KERNEL_ONLY = ("kvm_handle_guest_abort", "kvm_pgtable_stage2_map", "kvm_pgtable_stage2_relax_perms",
               "kvm_pgtable_stage2_split", "kvm_mmu_split_huge_pages", "kvm_flush_remote_tlbs_memslot",
               "kvm_flush_remote_tlbs_range", "kvm_arch_flush_remote_tlbs_range", "__kvm_tlb_flush_vmid_range")


@dataclass(frozen=True)
class Step:
    """A batch of guest writes (pages as guest page frame numbers), or a collection (``pages`` is None)."""

    pages: tuple[int, ...] | None

    @property
    def name(self) -> str:
        return "collect" if self.pages is None else f"write {len(self.pages)}"


def default_schedule() -> list[Step]:
    """Writes that cover one page, neighbours in one bitmap word, two words, several blocks, a page
    written again after its collection, an empty batch, and a collection with nothing new."""
    first = 2 * BLOCK_PAGES  # the third block: the first two hold the system area and the first workload pages
    return [
        Step((first, first + 1, first + 63, first + 64, first + BLOCK_PAGES + 5, first + 3 * BLOCK_PAGES + 100)),
        Step(None),
        Step((first, first + 200, first + 3 * BLOCK_PAGES + 101, first + 6 * BLOCK_PAGES)),
        Step(None),
        Step(()),
        Step(None),
        Step(None),
    ]


@dataclass
class Run:
    """What one side saw: per collection the dirty pages, per phase the counts."""

    dirty: list[list[int]] = field(default_factory=list)
    counts: list[dict[str, int]] = field(default_factory=list)  # phase 0 is "enable logging"
    notes: list[str] = field(default_factory=list)


def prelude_pages(npages: int) -> tuple[int, ...]:
    """One page in every 2 MiB block of the workload area, written before logging starts."""
    return tuple(range(BLOCK_PAGES, npages, BLOCK_PAGES))


# --- the kernel --------------------------------------------------------------------------------------


def run_kernel(schedule: list[Step], memory: int = MEMORY) -> tuple[Run, int, bool]:
    """Run ``schedule`` on this host's arm64 KVM; returns the run, the slot's host address, and whether
    its memory was backed by transparent huge pages."""
    arch = Arm64()
    functions = sorted({name for _, _, names in COUNTS for name in names} | set(KERNEL_ONLY))
    with Machine(memory, vcpus=1, workload="idle", program=arch.build_program("batch"), arch=arch,
                 huge_aligned=True) as machine:
        machine.start()
        _batch(machine, prelude_pages(machine.ram.npages))
        huge = _thp_backed(machine.ram.address, machine.ram.size)
        counter = FunctionCounter(functions)
        run = Run(notes=[f"not traceable here (inlined or notrace): {', '.join(counter.missing)}"]
                  if counter.missing else [])
        try:
            counter.take()
            machine.vm.set_slot_flags(0, abi.KVM_MEM_LOG_DIRTY_PAGES)
            run.counts.append(counter.take())
            words = np.zeros(machine.ram.npages // 64, dtype=np.uint64)
            for step in schedule:
                if step.pages is None:
                    machine.vm.get_dirty_log(0, words)
                    run.dirty.append(np.flatnonzero(np.unpackbits(words.view(np.uint8), bitorder="little")).tolist())
                else:
                    _batch(machine, step.pages)
                run.counts.append(counter.take())
        finally:
            counter.close()
        machine.check()
        return run, machine.ram.address, huge


def _batch(machine: Machine, pages: tuple[int, ...]) -> None:
    """Have the guest write ``pages`` and wait until it has. The control block is written behind the
    dirty log's back (``ram.words``): these are host writes KVM never sees, and must not count."""
    if len(pages) > MAX_BATCH_PAGES:
        raise LabError(f"a batch writes at most {MAX_BATCH_PAGES} pages, not {len(pages)}")
    words = machine.ram.words
    block = machine.control_block_addr(0) // 8
    seq = int(words[block + ControlBlock.BATCH_SEQ // 8]) + 1
    addresses = np.array(pages, dtype=np.uint64) * np.uint64(PAGE_SIZE)
    words[block + ControlBlock.BATCH_PAGES // 8:block + ControlBlock.BATCH_PAGES // 8 + len(pages)] = addresses
    words[block + ControlBlock.BATCH_COUNT // 8] = len(pages)
    words[block + ControlBlock.BATCH_SEQ // 8] = seq
    deadline = time.monotonic() + 30
    while machine.control(0, ControlBlock.ITERATION) != seq:
        machine.check()
        if time.monotonic() > deadline:
            raise LabError(f"the batch guest did not finish batch {seq} in 30 s")
        time.sleep(0.001)


def _thp_backed(address: int, size: int) -> bool:
    """Whether the mapping at ``address`` holds transparent huge pages (``AnonHugePages`` in smaps)."""
    current = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if "-" in line.split(" ", 1)[0] and not line.startswith(("AnonHuge", "Size")):
            start, _, end = line.split(" ", 1)[0].partition("-")
            current = int(start, 16) <= address < int(end, 16)
        elif current and line.startswith("AnonHugePages:"):
            return int(line.split()[1]) > 0
    return False


# --- the model ---------------------------------------------------------------------------------------


def run_model(schedule: list[Step], userspace_addr: int, hugepages: bool, memory: int = MEMORY) -> Run:
    """Replay ``schedule`` on the stage-2 model, every guest access of the batch program included."""
    kvm = kvm_create_vm(nr_vcpus=1, tlb_entries=None)
    vcpu = kvm.vcpus[0]
    npages = memory // PAGE_SIZE
    region = KvmUserspaceMemoryRegion(0, 0, 0, memory, userspace_addr)
    memslot = kvm_vm_ioctl_set_user_memory_region(kvm, region, hugepage_backed=hugepages)
    assert memslot is not None
    code, control = CODE_ADDR // PAGE_SIZE, Arm64().layout.control_block_addr(0) // PAGE_SIZE

    def fetch() -> None:
        vcpu_read(kvm, vcpu, code)

    def batch(pages: tuple[int, ...]) -> None:
        for gfn in pages:
            fetch()
            vcpu_write(kvm, vcpu, gfn)
        fetch()
        vcpu_write(kvm, vcpu, control)  # stlr ITERATION
        fetch()
        vcpu_read(kvm, vcpu, control)  # the wait loop

    # The program's start: fetch, read its control block, write its timing fields; then the wait loop.
    fetch()
    vcpu_read(kvm, vcpu, control)
    vcpu_write(kvm, vcpu, control)
    batch(prelude_pages(npages))
    run = Run()
    kvm.stat.clear()
    kvm_vm_ioctl_set_user_memory_region(kvm, KvmUserspaceMemoryRegion(0, KVM_MEM_LOG_DIRTY_PAGES, 0, memory,
                                                                      userspace_addr))
    run.counts.append(dict(kvm.stat))
    for step in schedule:
        kvm.stat.clear()
        if step.pages is None:
            buffer = bytearray(kvm_dirty_bitmap_bytes(memslot))
            kvm_vm_ioctl_get_dirty_log(kvm, KvmDirtyLog(0, buffer))
            bits = np.unpackbits(np.frombuffer(buffer, dtype=np.uint8), bitorder="little")
            run.dirty.append(np.flatnonzero(bits).tolist())
        else:
            batch(step.pages)
        run.counts.append(dict(kvm.stat))
    return run


# --- side by side ------------------------------------------------------------------------------------


@dataclass
class Comparison:
    """The two runs of one schedule, and whether their dirty sets agree."""

    kernel: Run
    model: Run
    schedule: list[Step]
    hugepages: bool
    kernel_release: str

    @property
    def same_dirty_sets(self) -> bool:
        return self.kernel.dirty == self.model.dirty

    def rows(self) -> list[tuple[str, str, str, int, int | None]]:
        """(phase, what, kernel function, model count, kernel count or None when not traceable) per count."""
        out = []
        phases = ["enable logging", *[step.name for step in self.schedule]]
        for index, phase in enumerate(phases):
            kernel, model = self.kernel.counts[index], self.model.counts[index]
            for what, model_name, kernel_names in COUNTS:
                seen = next((name for name in kernel_names if name in kernel), None)
                out.append((f"{index}: {phase}", what, seen or "-", model.get(model_name, 0),
                            kernel[seen] if seen else None))
            for name in KERNEL_ONLY:
                if name in kernel:
                    out.append((f"{index}: {phase}", "kernel only", name, 0, kernel[name]))
        return out

    def totals(self) -> dict[str, tuple[int, int | None]]:
        """Per count, the model's and the kernel's totals over the whole schedule."""
        model: Counter[str] = Counter()
        kernel: dict[str, int | None] = {}
        for _, what, _, model_count, kernel_count in self.rows():
            model[what] += model_count
            if kernel_count is None:
                kernel.setdefault(what, None)
            else:
                kernel[what] = (kernel.get(what) or 0) + kernel_count
        return {what: (model[what], kernel.get(what)) for what in dict.fromkeys(w for _, w, _, _, _ in self.rows())}


def compare(schedule: list[Step] | None = None) -> Comparison:
    """Run the schedule on the kernel, then on the model with the kernel run's slot address and backing."""
    import platform

    schedule = schedule or default_schedule()
    kernel, address, huge = run_kernel(schedule)
    model = run_model(schedule, address, huge)
    return Comparison(kernel, model, schedule, huge, platform.release())
