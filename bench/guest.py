"""Guest speed on real KVM: is the guest native, and what do writes, first touches and pauses cost?

    python bench/guest.py [--memory 1G] [--json]

Measures, in one run:
  * guest loop iterations per second (a ``dec rcx; jnz`` loop): native is above 1e9/s on these machines,
    the PVM instruction emulator about 1e6/s, so this proves the guest runs natively;
  * steady-state page writes per second per vCPU on a resident working set (``sequential`` and ``random``),
    and the 2-vCPU / 1-vCPU throughput ratio;
  * first-touch cost per page, with host memory allocated lazily and with it prefaulted;
  * ``pause()`` latency (median and worst of many), and ``resume()`` latency.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from dirtylog.guest.machine import Machine
from dirtylog.guest.programs import ControlBlock, build_program
from dirtylog.units import parse_size


def wait(condition, timeout: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark step did not finish")
        time.sleep(0.0005)


def loop_iterations_per_second(iterations: int) -> float:
    with Machine("32M", vcpus=1, workload="idle", program=build_program("count")) as machine:
        machine.set_control(0, ControlBlock.COUNT, iterations)
        machine.start()
        start = time.perf_counter()
        wait(lambda: 0 in machine.done_at)
        return iterations / (machine.done_at[0] - start)


def steady_writes(memory: int, vcpus: int, workload: str, seconds: float) -> float:
    """Pages written per second per vCPU once every page is resident."""
    with Machine(memory, vcpus=vcpus, workload=workload, prefault=True) as machine:  # type: ignore[arg-type]
        machine.start()
        wait(lambda: machine.progress > 4 * len(machine.workload_pages))  # warm: all pages touched
        first, start = machine.progress, time.perf_counter()
        time.sleep(seconds)
        return (machine.progress - first) / (time.perf_counter() - start) / vcpus


def first_touch_per_page(memory: int, prefault: bool) -> float:
    """Seconds per page of the first sequential pass over memory the guest has never touched."""
    with Machine(memory, vcpus=1, workload="sequential", prefault=prefault) as machine:
        machine.start()
        start = time.perf_counter()
        wait(lambda: machine.iterations[0] >= 1)
        return (time.perf_counter() - start) / len(machine.workload_pages)


def pause_latency(rounds: int) -> tuple[list[float], list[float]]:
    with Machine("256M", vcpus=2, workload="random", prefault=True) as machine:
        machine.start()
        pauses, resumes = [], []
        for _ in range(rounds):
            time.sleep(0.005)
            start = time.perf_counter()
            machine.pause()
            pauses.append(time.perf_counter() - start)
            start = time.perf_counter()
            machine.resume()
            resumes.append(time.perf_counter() - start)
        return pauses, resumes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory", default="1G", help="guest memory for the write and first-touch runs")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each steady-state measurement")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    memory = parse_size(args.memory)

    loop = loop_iterations_per_second(3_000_000_000)
    writes = {(w, v): steady_writes(memory, v, w, args.seconds) for w in ("sequential", "random") for v in (1, 2)}
    lazy, prefaulted = first_touch_per_page(memory, False), first_touch_per_page(memory, True)
    pauses, resumes = pause_latency(200)
    results = {
        "memory": memory,
        "loop_iterations_per_s": loop,
        "native_vs_emulated_threshold": loop / 1e9,
        "writes_per_s_per_vcpu": {f"{w}/{v}vcpu": rate for (w, v), rate in writes.items()},
        "two_vcpu_scaling": {w: 2 * writes[(w, 2)] / writes[(w, 1)] for w in ("sequential", "random")},
        "first_touch_us_per_page": {"lazy": lazy * 1e6, "prefaulted": prefaulted * 1e6,
                                    "lazy_over_prefaulted": lazy / prefaulted},
        "pause_ms": {"median": statistics.median(pauses) * 1e3, "max": max(pauses) * 1e3},
        "resume_ms": {"median": statistics.median(resumes) * 1e3, "max": max(resumes) * 1e3},
    }
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"guest loop:        {loop:,.0f} iterations/s  ({loop / 1e9:.2f}x the 1e9/s native threshold; "
          "the emulator does ~1e6/s)")
    for (w, v), rate in writes.items():
        print(f"writes {w:>10} {v} vCPU: {rate:,.0f} pages/s per vCPU")
    for w, ratio in results["two_vcpu_scaling"].items():  # type: ignore[attr-defined]
        print(f"2 vCPUs / 1 vCPU total throughput ({w}): {ratio:.2f}x")
    print(f"first touch:       {lazy * 1e6:.1f} us/page lazy, {prefaulted * 1e6:.1f} us/page prefaulted "
          f"({lazy / prefaulted:.1f}x)")
    print(f"pause():           median {statistics.median(pauses) * 1e3:.3f} ms, max {max(pauses) * 1e3:.3f} ms "
          f"(200 pauses, 2 vCPUs)")
    print(f"resume():          median {statistics.median(resumes) * 1e3:.3f} ms, max {max(resumes) * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
