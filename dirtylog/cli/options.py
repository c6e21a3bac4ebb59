"""Arguments several sub-commands share, and their conversion into machines."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeVar

from dirtylog.errors import DirtylogError
from dirtylog.machine import Machine
from dirtylog.units import UnitError, parse_duration, parse_rate, parse_size
from dirtylog.workload import WORKLOAD_HELP, WORKLOADS

T = TypeVar("T")


def _argtype(parse: Callable[[str], T], name: str) -> Callable[[str], T]:
    def convert(text: str) -> T:
        try:
            return parse(text)
        except UnitError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.__name__ = name  # argparse names the type in its error message
    return convert


size_arg = _argtype(parse_size, "size")
duration_arg = _argtype(parse_duration, "duration")
rate_arg = _argtype(parse_rate, "rate")


def _positive_duration(text: str) -> float:
    seconds = parse_duration(text)
    if seconds <= 0:
        raise UnitError(f"duration {text!r} must be more than zero")
    return seconds


def _positive_rate(text: str) -> int:
    rate = parse_rate(text)
    if rate <= 0:
        raise UnitError(f"rate {text!r} must be more than zero bytes per second")
    return rate


positive_duration_arg = _argtype(_positive_duration, "duration > 0")
positive_rate_arg = _argtype(_positive_rate, "rate > 0")


def whole_number(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``minimum`` (and at most ``maximum``)."""
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"at least {minimum}" if maximum is None else f"between {minimum} and {maximum}"
            raise argparse.ArgumentTypeError(f"{value} must be {bound}")
        return value

    convert.__name__ = f"number >= {minimum}"
    return convert


positive_int = whole_number(1)


def add_machine_arguments(parser: argparse.ArgumentParser, *, memory: str = "1G", vcpus: int = 2,
                          workload: str = "random") -> None:
    """--memory, --vcpus, --workload, --rate and the workload's shape."""
    group = parser.add_argument_group("machine")
    group.add_argument("--memory", type=size_arg, default=parse_size(memory),
                       help=f"guest RAM, e.g. 512M or 4G (default {memory})")
    group.add_argument("--vcpus", type=positive_int, default=vcpus, help=f"vCPUs (default {vcpus})")
    group.add_argument("--workload", choices=WORKLOADS, default=workload,
                       help="; ".join(f"{name}: {text}" for name, text in WORKLOAD_HELP.items()))
    group.add_argument("--rate", type=positive_int, default=None,
                       help="pages per second per vCPU (default: as fast as the vCPU goes)")
    group.add_argument("--slots", type=positive_int, default=1, help="memory slots RAM is split into (default 1)")
    group.add_argument("--prefault", action="store_true",
                       help="allocate all guest memory before starting (faster first touches)")
    group.add_argument("--hot-fraction", type=float, default=0.1,
                       help="hotset: fraction of pages that are hot (default 0.1)")
    group.add_argument("--hot-weight", type=float, default=0.9,
                       help="hotset: fraction of writes that go to hot pages (default 0.9)")
    group.add_argument("--trace", metavar="FILE",
                       help="trace: the recorded dirty-page trace to replay (from `dirtylog track --record FILE`)")


def machine_from_args(args: argparse.Namespace, *, dirty_ring: bool = False) -> Machine:
    """A new (not started) machine from :func:`add_machine_arguments`'s options; the one place the CLI
    builds machines. ``dirty_ring`` gives its vCPUs dirty rings (they must exist before the vCPUs)."""
    trace = getattr(args, "trace", None)
    if trace and args.workload != "trace":
        raise DirtylogError(f"--trace FILE is replayed by the trace workload; add --workload trace "
                            f"(not {args.workload})")
    return Machine(args.memory, args.vcpus, args.workload, args.rate, slots=args.slots,
                   hot_fraction=args.hot_fraction, hot_weight=args.hot_weight, prefault=args.prefault,
                   dirty_ring=dirty_ring, trace=trace)
