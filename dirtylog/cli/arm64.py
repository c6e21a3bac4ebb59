"""``dirtylog arm64``: run a command inside an emulated arm64 host with KVM (the seed patch's own architecture).

    dirtylog arm64 -- dirtylog track --verify --mode log --memory 64M
    dirtylog arm64 --kernel debian13 -- python3 -m pytest tests/tracking
    dirtylog arm64 --shell

The first run builds and caches the environment from the registries (a Debian arm64 cloud kernel,
Debian 12's Python, PyPI's aarch64 wheels); later runs boot from the cache. The current dirtylog source
tree is copied in at every run, so the command runs the code being worked on. See docs/arm64.md.
"""

from __future__ import annotations

import argparse

from dirtylog.cli.options import duration_arg, positive_int, size_arg
from dirtylog.errors import DirtylogError
from dirtylog.lab import environment, qemu
from dirtylog.lab.debian import RELEASES


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "arm64", help="run a command on an emulated arm64 host with KVM (QEMU with EL2)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernel", choices=sorted(RELEASES), default="debian12",
                        help="the Debian cloud kernel to boot: debian12 (6.1) or debian13 (6.12); default debian12")
    parser.add_argument("--cpus", type=positive_int, default=2, help="emulated CPUs (default 2)")
    parser.add_argument("--memory", type=size_arg, default=size_arg("2G"), help="emulated RAM (default 2G)")
    parser.add_argument("--nvhe", action="store_true", help="boot KVM in nVHE mode (kvm-arm.mode=nvhe) instead of VHE")
    parser.add_argument("--refresh", action="store_true",
                        help="resolve the packages again (a newer kernel or wheels) instead of using the cache")
    parser.add_argument("--timeout", type=duration_arg, default=900.0,
                        help="stop the run after this long (default 15m)")
    parser.add_argument("--shell", action="store_true", help="an interactive shell instead of a command")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run inside (after --)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if args.shell == bool(command):
        raise DirtylogError("give a command after -- (e.g. `dirtylog arm64 -- dirtylog info`) or --shell, "
                            "not both or neither")
    qemu.find_qemu()  # fail before downloading anything
    built = environment.build(args.kernel, refresh=args.refresh)
    options = qemu.BootOptions(cpus=args.cpus, memory_mib=args.memory >> 20, nvhe=args.nvhe, timeout=args.timeout)
    return qemu.run(built, None if args.shell else command, options)
