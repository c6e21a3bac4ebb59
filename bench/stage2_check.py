#!/usr/bin/env python3
"""How fast the stage-2 interleaving checker is: the default exhaustive check of the patch and of every mutant,
and a random-schedule run on a larger configuration, each with the ``dirtylog`` command that reproduces it.

    python3 bench/stage2_check.py            # table for people
    python3 bench/stage2_check.py --json     # one JSON object per line
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

from dirtylog.stage2.checker import CheckConfig, CheckResult, check
from dirtylog.stage2.mutants import MUTANTS, PATCH, Variant

LARGE = CheckConfig(vcpus=4, pages=1024, writes=12, collections=4, random_schedules=500, seed=0)


def command(config: CheckConfig, variant: Variant) -> str:
    """The CLI invocation that runs the same check."""
    parts = ["dirtylog model check"]
    if not variant.is_patch:
        parts.append(f"--mutant {variant.name}")
    default = CheckConfig()
    for name in ("vcpus", "pages", "writes", "collections", "random_schedules", "seed"):
        value = getattr(config, name)
        if value != getattr(default, name):
            parts.append(f"--{name.replace('_', '-')} {value}")
    return " ".join(parts)


def row(result: CheckResult, variant: Variant) -> dict[str, object]:
    return {
        "command": command(result.config, variant),
        "verdict": "ok" if result.ok else result.counterexample.invariant if result.counterexample else "?",
        "states": result.states,
        "transitions": result.transitions,
        "states_per_second": round(result.states_per_second),
        "seconds": round(result.seconds, 3),
        "trace_steps": len(result.counterexample.trace) if result.counterexample else 0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args()
    runs = [(CheckConfig(), variant) for variant in (PATCH, *MUTANTS)] + [(LARGE, PATCH)]
    rows = []
    for config, variant in runs:
        result = check(config, variant)
        if result.ok != variant.is_patch:
            print(f"UNEXPECTED verdict for {variant.name}: ok={result.ok}", file=sys.stderr)
            return 1
        rows.append(row(result, variant))
        if args.json:
            print(json.dumps(rows[-1]))
    if not args.json:
        print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs, one process")
        print(f"{'verdict':>10} {'states':>9} {'states/s':>9} {'seconds':>8} {'trace':>6}  command")
        for r in rows:
            print(
                f"{r['verdict']:>10} {r['states']:>9,} {r['states_per_second']:>9,} {r['seconds']:>8.2f} "
                f"{r['trace_steps']:>6}  {r['command']}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
