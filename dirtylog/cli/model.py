"""``dirtylog model``: the seed patch's ARM stage-2 algorithm as a model, and its interleaving checker.

``dirtylog model check`` explores every interleaving of vCPU and collector steps (or random schedules) and
exits 0 when no write is lost and no page is reported without a write, 1 with a counterexample trace.
``dirtylog model mutants`` lists the broken variants ``--mutant`` can select.
"""

from __future__ import annotations

import argparse
from typing import Any

from rich.table import Table

from dirtylog.cli.options import whole_number
from dirtylog.cli.output import console, emit_json, key_value_table
from dirtylog.guest.arch import ArchitectureError
from dirtylog.stage2.checker import CheckConfig, CheckResult, check
from dirtylog.stage2.mutants import MUTANTS, PATCH, variant_named


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``model check`` and ``model mutants``."""
    parser = subparsers.add_parser(
        "model",
        help="check the ARM stage-2 dirty-log algorithm of the seed patch under every interleaving",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="model_command", metavar="ACTION")
    defaults = CheckConfig()

    check_parser = actions.add_parser(
        "check",
        help="explore interleavings of vCPU writes and KVM_GET_DIRTY_LOG; exit 1 on a counterexample",
        description="Explore every interleaving (or --random-schedules random ones) of vCPUs writing "
        "and KVM_GET_DIRTY_LOG collecting, checking that no write is lost and no page is reported unwritten.",
    )
    check_parser.add_argument(
        "--mutant",
        metavar="NAME",
        default=None,
        help="check a broken variant instead of the patch (see `model mutants`)",
    )
    shape = check_parser.add_argument_group("configuration")
    shape.add_argument(
        "--vcpus", type=whole_number(1), default=defaults.vcpus, help=f"vCPUs (default {defaults.vcpus})"
    )
    shape.add_argument(
        "--pages",
        type=whole_number(1),
        default=defaults.pages,
        help=f"pages in the memslot (default {defaults.pages})",
    )
    shape.add_argument(
        "--writes", type=whole_number(0), default=defaults.writes, help=f"writes per vCPU (default {defaults.writes})"
    )
    shape.add_argument(
        "--collections",
        type=whole_number(1),
        default=defaults.collections,
        help=f"KVM_GET_DIRTY_LOG calls, the last after every vCPU finished (default {defaults.collections})",
    )
    sampling = check_parser.add_argument_group("sampling")
    sampling.add_argument(
        "--random-schedules",
        type=whole_number(0),
        default=0,
        metavar="S",
        help="run S random schedules instead of exploring all (for configurations too large to exhaust)",
    )
    sampling.add_argument("--seed", type=int, default=0, help="seed of the random schedules (default 0)")
    check_parser.add_argument("--json", action="store_true", help="print one JSON object")
    check_parser.set_defaults(func=run_check)

    mutants_parser = actions.add_parser("mutants", help="list the mutants --mutant can select")
    mutants_parser.add_argument("--json", action="store_true", help="print one JSON object")
    mutants_parser.set_defaults(func=run_mutants)

    compare_parser = actions.add_parser(
        "compare", help="run one schedule of writes and collections on the model and on this arm64 host's KVM",
        description="Run a schedule of guest writes and KVM_GET_DIRTY_LOG calls on the real arm64 kernel (with "
        "ftrace counting its functions) and on the stage-2 model; exit 1 if the dirty sets differ. Needs an "
        "arm64 KVM host: run it as `dirtylog arm64 -- dirtylog model compare`.")
    compare_parser.add_argument("--json", action="store_true", help="print one JSON object")
    compare_parser.set_defaults(func=run_compare)

    def help_and_fail(args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=help_and_fail)


def run_check(args: argparse.Namespace) -> int:
    """``dirtylog model check``."""
    variant = variant_named(args.mutant)
    config = CheckConfig(
        vcpus=args.vcpus,
        pages=args.pages,
        writes=args.writes,
        collections=args.collections,
        random_schedules=args.random_schedules,
        seed=args.seed,
    )
    result = check(config, variant)
    if args.json:
        emit_json(result.to_json())
    else:
        _print_result(result)
    return 0 if result.ok else 1


def _print_result(result: CheckResult) -> None:
    config = result.config
    variant = variant_named(None if result.variant == PATCH.name else result.variant)
    verdict = "[green]invariants hold[/green]" if result.ok else "[red]counterexample found[/red]"
    if result.ok and not result.complete:
        verdict = "[yellow]no counterexample in the states explored (state limit reached)[/yellow]"
    rows: list[tuple[str, Any]] = [
        ("verdict", verdict),
        ("checked", f"{variant.name}: {variant.summary}"),
        (
            "configuration",
            f"{config.vcpus} vCPUs x {config.writes} writes, {config.pages} pages, "
            f"{config.collections} collections (the last after the vCPUs finish)",
        ),
        (
            "mode",
            result.mode if result.mode == "exhaustive" else f"random, {result.schedules} schedules, seed {config.seed}",
        ),
        ("states", f"{result.states:,}"),
        ("transitions", f"{result.transitions:,}"),
        ("states/s", f"{result.states_per_second:,.0f}"),
        ("time", f"{result.seconds:.2f} s"),
    ]
    if not variant.is_patch:
        rows.insert(2, ("change", variant.change))
    console.print(key_value_table("dirtylog model check", rows))
    counterexample = result.counterexample
    if counterexample is None:
        return
    table = Table(title=f"{counterexample.invariant}: {counterexample.detail}", title_justify="left")
    table.add_column("step", justify="right")
    table.add_column("actor")
    table.add_column("action")
    table.add_column("state change")
    for step in counterexample.trace:
        table.add_row(str(step.step), step.actor, step.action, step.change)
    console.print(table)


def run_mutants(args: argparse.Namespace) -> int:
    """``dirtylog model mutants``."""
    if args.json:
        emit_json({"mutants": [{"name": m.name, "summary": m.summary, "change": m.change} for m in MUTANTS]})
        return 0
    table = Table(title="mutants of the seed patch (dirtylog model check --mutant NAME)", title_justify="left")
    table.add_column("name", style="bold")
    table.add_column("what changes")
    for mutant in MUTANTS:
        table.add_row(mutant.name, mutant.summary)
    console.print(table)
    return 0


def run_compare(args: argparse.Namespace) -> int:
    """``dirtylog model compare``."""
    from dirtylog.guest.host import host_machine

    if host_machine() != "aarch64":
        raise ArchitectureError("model compare runs the seed's own architecture: it needs an arm64 KVM host; "
                                "run `dirtylog arm64 -- dirtylog model compare`")
    from dirtylog.lab.schedule import compare

    result = compare()
    totals = result.totals()
    if args.json:
        emit_json({"kernel": result.kernel_release, "hugepages": result.hugepages,
                   "same_dirty_sets": result.same_dirty_sets, "kernel_dirty": result.kernel.dirty,
                   "model_dirty": result.model.dirty, "totals": totals, "notes": result.kernel.notes,
                   "rows": result.rows()})
        return 0 if result.same_dirty_sets else 1
    table = Table(title=f"model against kernel {result.kernel_release} (huge-page backed: {result.hugepages})",
                  title_justify="left")
    for column in ("count", "model", "kernel"):
        table.add_column(column)
    for what, (model, kernel) in totals.items():
        table.add_row(what, str(model), "not traceable" if kernel is None else str(kernel))
    console.print(table)
    for index, (kernel_set, model_set) in enumerate(zip(result.kernel.dirty, result.model.dirty, strict=True)):
        verdict = "[green]same[/green]" if kernel_set == model_set else f"[red]model {model_set}[/red]"
        console.print(f"collection {index + 1}: kernel {kernel_set} {verdict}")
    for note in result.kernel.notes:
        console.print(note)
    return 0 if result.same_dirty_sets else 1
