"""Before and after: one live migration measured with two source trees of dirtylog, interleaved.

    python bench/compare_trees.py --trees /work/wt/base . [--pairs 5] [--memory 1G] [--ready] [--json]

A run: a guest of ``--memory`` (2 vCPUs, ``idle``) whose memory the host has filled with distinct non-zero
pages, started, its compiled passes loaded, warmed up for 0.5 s, then migrated over loopback with one stream
and a 50 ms downtime limit to a `dirtylog receive` process; with ``--ready`` the destination gets ``--memory``
too (which prepares its VM only in trees that have a ready destination). Reported per run: round-0
throughput, total time, setup, downtime, and both sides' CPU seconds per GB in round 0.

Every run is its own process with ``PYTHONPATH`` and the working directory set to the tree under test, and
its destination process uses the same tree, so nothing from another tree (or from an installed copy) is
imported; each run prints the file its ``dirtylog`` came from. The trees alternate A B A B ... and ratios
B / A are taken within each pair, since this machine's speed drifts over minutes. Both APIs work:
``dirtylog.migration.migrate`` and ``preload`` (the restructured package) or ``dirtylog.migration.source
.migrate`` with the two ``load_kernels`` (before it).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

WARMUP_S = 0.5
DOWNTIME_LIMIT = "50ms"


def tree_env(tree: Path) -> dict[str, str]:
    """The environment of a process that must import dirtylog from ``tree`` only."""
    return {**os.environ, "PYTHONPATH": str(tree)}


def _first(*candidates: tuple[str, str]) -> Any:
    """The first ``(module, name)`` this tree has."""
    for module, name in candidates:
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise SystemExit(f"this tree has none of {candidates}")


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worker(memory: int, key: str, ready: bool) -> dict[str, Any]:
    """One migration with the dirtylog on ``sys.path`` (the tree under test); its figures."""
    import numpy as np

    import dirtylog

    machine_class = _first(("dirtylog.machine", "Machine"))
    migrate = _first(("dirtylog.migration", "migrate"), ("dirtylog.migration.source", "migrate"))
    page_size = int(_first(("dirtylog.units", "PAGE_SIZE")))
    command = [sys.executable, "-m", "dirtylog", "receive", "--listen", "127.0.0.1:0", "--key-file", key,
               "--duration", "0", "--json", *(["--memory", str(memory)] if ready else [])]
    destination = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    assert destination.stdout is not None
    address = json.loads(destination.stdout.readline())["address"]
    marks: list[tuple[float, float, float]] = []

    def progress(kind: str, record: dict[str, Any]) -> None:  # CPU at the start of round 0 and at its end
        if kind == "setup" or (kind == "round" and len(marks) == 1):
            marks.append((time.process_time(), process_cpu(destination.pid), time.perf_counter()))

    with machine_class(memory, vcpus=2, workload="idle", prefault=True) as machine:
        pages = machine.memory[machine.workload_pages.start * page_size:].reshape(-1, page_size)
        block = np.random.default_rng(1).integers(1, 256, (4096, page_size), dtype=np.uint8)
        for first in range(0, pages.shape[0], block.shape[0]):
            part = pages[first:first + block.shape[0]]
            part[:] = block[:part.shape[0]]
        pages.view(np.uint64)[:, 0] = np.arange(pages.shape[0], dtype=np.uint64) + 1  # distinct, never zero
        machine.start()
        try:
            _first(("dirtylog.migration", "preload"))()
        except SystemExit:  # before the restructure: what its _connect() loads
            _first(("dirtylog.bitmap", "load_kernels"))()
            _first(("dirtylog.migration.digest", "load_kernels"))()
        time.sleep(WARMUP_S)
        stats = migrate(machine, address, key_file=key, downtime_limit=DOWNTIME_LIMIT, streams=1,
                        progress=progress).as_dict()
    out, _ = destination.communicate(timeout=300)
    first_round = stats["rounds"][0]
    gigabytes = first_round["bytes"] / 1e9
    (cpu0, dest0, wall0), (cpu1, dest1, wall1) = marks[0], marks[1]
    return {
        "dirtylog": dirtylog.__file__, "status": stats["status"],
        "round0_gbps": first_round["bytes"] / first_round["seconds"] / 1e9,
        "total_ms": stats["total_time_ms"], "setup_ms": stats["setup_time_ms"], "downtime_ms": stats["downtime_ms"],
        "setup_phases_ms": stats.get("setup_phases_ms", {}),  # trees that break setup down
        "rounds": len(stats["rounds"]),
        "cpu_s_per_gb": {"source": (cpu1 - cpu0) / gigabytes, "destination": (dest1 - dest0) / gigabytes},
        "busy": {"source": (cpu1 - cpu0) / (wall1 - wall0), "destination": (dest1 - dest0) / (wall1 - wall0)},
        "destination_completed": any(json.loads(line).get("event") == "completed"
                                     for line in out.splitlines() if line.startswith("{")),
    }


def run_one(tree: Path, memory: int, key: str, ready: bool) -> dict[str, Any]:
    """A worker process on ``tree``; its figures, or the failure."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--memory", str(memory), "--key", key,
               *(["--ready"] if ready else [])]
    done = subprocess.run(command, cwd=tree, env=tree_env(tree), capture_output=True, text=True, timeout=600,
                          check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"status": "failed", "error": (done.stderr or done.stdout)[-600:]}
    result: dict[str, Any] = json.loads(lines[-1])
    if not result["dirtylog"].startswith(str(tree)):
        raise SystemExit(f"a run meant for {tree} imported {result['dirtylog']}")
    return result


def compare(trees: list[Path], pairs: int, memory: int, ready: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        key = str(Path(folder) / "migration.key")
        subprocess.run([sys.executable, "-m", "dirtylog", "keygen", key], cwd=trees[0], env=tree_env(trees[0]),
                       check=True, capture_output=True)
        load_before = os.getloadavg()
        runs = []
        for pair in range(pairs):
            for label, tree in zip("AB", trees, strict=True):
                runs.append({"pair": pair, "tree": label, "load": os.getloadavg()[0],
                             **run_one(tree, memory, key, ready)})
        load_after = os.getloadavg()
    return {"trees": {label: str(tree) for label, tree in zip("AB", trees, strict=True)}, "memory": memory,
            "ready": ready, "load_before": load_before, "load_after": load_after, "runs": runs,
            "summary": summarize(runs)}


FIGURES = ("round0_gbps", "total_ms", "setup_ms", "downtime_ms")


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per tree, and the medians of the B / A ratios within each pair."""
    ok = [r for r in runs if r["status"] == "completed"]
    by_pair = {(r["pair"], r["tree"]): r for r in ok}
    pairs = sorted({p for p, tree in by_pair if tree == "A" and (p, "B") in by_pair})
    summary: dict[str, Any] = {"pairs": len(pairs), "failed": len(runs) - len(ok)}
    for figure in FIGURES:
        values = {tree: [r[figure] for r in ok if r["tree"] == tree] for tree in "AB"}
        ratios = [by_pair[(p, "B")][figure] / by_pair[(p, "A")][figure] for p in pairs if by_pair[(p, "A")][figure]]
        summary[figure] = {
            **{tree: float(statistics.median(v)) if v else None for tree, v in values.items()},
            "ratio": float(statistics.median(ratios)) if ratios else None,
            "ratios": [round(x, 3) for x in ratios],
        }
    for side in ("source", "destination"):
        values = {tree: [r["cpu_s_per_gb"][side] for r in ok if r["tree"] == tree] for tree in "AB"}
        summary[f"{side}_cpu_s_per_gb"] = {tree: float(statistics.median(v)) if v else None
                                           for tree, v in values.items()}
    return summary


def print_comparison(result: dict[str, Any]) -> None:
    print(f"A = {result['trees']['A']}, B = {result['trees']['B']}; {result['memory'] >> 20} MiB idle guest, filled, "
          f"1 stream, limit {DOWNTIME_LIMIT}, destination {'ready (--memory)' if result['ready'] else 'plain'}; "
          f"load average {result['load_before'][0]:.2f} -> {result['load_after'][0]:.2f}")
    for run in result["runs"]:
        head = f"  pair {run['pair']} {run['tree']} (load {run['load']:.1f}): "
        if run["status"] != "completed":
            print(head + f"{run['status']}: {run.get('error', '')[-200:]}")
            continue
        print(head + f"round 0 {run['round0_gbps']:.2f} GB/s, total {run['total_ms']:,.1f} ms (setup "
              f"{run['setup_ms']:,.1f}), downtime {run['downtime_ms']:.1f} ms, {run['rounds']} rounds; CPU s/GB "
              f"source {run['cpu_s_per_gb']['source']:.3f} ({run['busy']['source']:.0%} busy), destination "
              f"{run['cpu_s_per_gb']['destination']:.3f} ({run['busy']['destination']:.0%})")
    summary = result["summary"]
    print(f"medians over {summary['pairs']} pairs ({summary['failed']} runs failed):")
    for figure in FIGURES:
        one = summary[figure]
        print(f"  {figure:>12}: A {one['A']}, B {one['B']}; B/A {one['ratio']:.3f} {one['ratios']}")
    for side in ("source", "destination"):
        one = summary[f"{side}_cpu_s_per_gb"]
        print(f"  CPU s/GB {side}: A {one['A']}, B {one['B']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trees", nargs=2, type=Path, metavar=("A", "B"), help="the two source trees, A first")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--memory", default="1G", help="guest memory, e.g. 1G (default)")
    parser.add_argument("--ready", action="store_true", help="give the destination --memory too")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--key", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:  # in a process of its own, on the tree under test
        print(json.dumps(worker(int(args.memory), args.key, args.ready)))
        return
    if args.trees is None:
        parser.error("give --trees A B")
    trees = [tree.absolute() for tree in args.trees]
    for tree in trees:
        if not (tree / "dirtylog" / "__init__.py").is_file():
            parser.error(f"{tree} is not a dirtylog source tree (no dirtylog/__init__.py)")
    from dirtylog.units import UnitError, parse_size  # only to read the option: the runs import their own trees

    try:
        memory = parse_size(args.memory)
    except UnitError as error:
        parser.error(str(error))
    result = compare(trees, args.pairs, memory, args.ready)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_comparison(result)


if __name__ == "__main__":
    main()
