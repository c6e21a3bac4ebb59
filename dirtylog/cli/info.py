"""``dirtylog info``: what this host's KVM offers for dirty logging."""

from __future__ import annotations

import argparse
from typing import Any

from dirtylog.cli.output import console, emit_json, key_value_table
from dirtylog.kvm import abi
from dirtylog.kvm.system import Kvm


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("info", help="KVM API version, host type and dirty-log capabilities")
    parser.add_argument("--json", action="store_true", help="one JSON object")
    parser.set_defaults(func=run)


def kvm_info(kvm: Kvm) -> dict[str, Any]:
    """Facts about ``kvm`` that matter for dirty logging."""
    manual = kvm.check_extension(abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
    return {
        "device": kvm.device,
        "api_version": kvm.api_version,
        "host_type": kvm.host_type,
        "max_vcpus": kvm.max_vcpus,
        "recommended_vcpus": kvm.check_extension(abi.KVM_CAP_NR_VCPUS),
        "max_memslots": kvm.max_memslots,
        "dirty_log": {
            "get_dirty_log": bool(kvm.check_extension(abi.KVM_CAP_USER_MEMORY)),
            "manual_protect": bool(manual & abi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE),
            "initially_set": bool(manual & abi.KVM_DIRTY_LOG_INITIALLY_SET),
            "dirty_ring_max_bytes": kvm.check_extension(abi.KVM_CAP_DIRTY_LOG_RING),
            "dirty_ring_acq_rel": bool(kvm.check_extension(abi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL)),
            "dirty_ring_with_bitmap": bool(kvm.check_extension(abi.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)),
        },
        "immediate_exit": bool(kvm.check_extension(abi.KVM_CAP_IMMEDIATE_EXIT)),
    }


def run(args: argparse.Namespace) -> int:
    with Kvm() as kvm:
        info = kvm_info(kvm)
    if args.json:
        emit_json(info)
        return 0
    log = info["dirty_log"]
    ring = log["dirty_ring_max_bytes"]
    console.print(key_value_table("KVM", [
        ("device", info["device"]),
        ("API version", info["api_version"]),
        ("host type", info["host_type"]),
        ("vCPUs per VM", f"{info['max_vcpus']} (recommended {info['recommended_vcpus']})"),
        ("memory slots per VM", info["max_memslots"]),
        ("KVM_GET_DIRTY_LOG", "yes" if log["get_dirty_log"] else "no"),
        ("KVM_CLEAR_DIRTY_LOG (manual protect)",
         ("yes" if log["manual_protect"] else "no") + (", initially-set" if log["initially_set"] else "")),
        ("dirty ring", f"yes, up to {ring // 16} entries ({ring // 1024} KiB) per vCPU"
         + (", acquire/release" if log["dirty_ring_acq_rel"] else "") if ring else "no"),
        ("immediate_exit", "yes" if info["immediate_exit"] else "no"),
    ]))
    return 0
