"""A machine as the migration stream's Header describes it, and back: what a migration sends of the VM beside its
memory, and what a snapshot records. One place, so that a source, a destination and a snapshot never disagree."""

from __future__ import annotations

from typing import Any

from dirtylog.guest.machine import Machine
from dirtylog.migration.protocol.events import Codec, Header
from dirtylog.units import PAGE_SIZE


def header_of(machine: Machine, *, codec: Codec = "none", streams: int = 1, postcopy: bool = False) -> Header:
    """The Header a migration of ``machine`` sends: page size, memory slots, vCPUs, workload (and whether the
    migration may switch to post-copy)."""
    spec = machine.spec
    return Header(
        page_size=PAGE_SIZE,
        slots=tuple(slot.layout for slot in machine.vm.slots.values()),
        vcpus=spec.vcpus,
        workload={"name": spec.name, "rate": spec.rate, "hot_fraction": spec.hot_fraction,
                  "hot_weight": spec.hot_weight, "writes_per_iteration": spec.writes_per_iteration},
        codec=codec,
        streams=streams,
        postcopy=postcopy,
    )


def workload_arguments(header: Header) -> dict[str, Any]:
    """The workload of ``header`` as keyword arguments of ``Machine`` (and of ``Machine.assume_workload``)."""
    workload = header.workload
    return {"workload": workload.get("name", "idle"), "rate": workload.get("rate"),
            "hot_fraction": workload.get("hot_fraction", 0.1), "hot_weight": workload.get("hot_weight", 0.9),
            "writes_per_iteration": workload.get("writes_per_iteration", 0)}


def machine_arguments(header: Header) -> dict[str, Any]:
    """Keyword arguments of a blank ``Machine`` laid out as ``header`` says (as a migration destination builds)."""
    return {"memory": header.memory_bytes, "vcpus": header.vcpus, "slots": len(header.slots),
            **workload_arguments(header)}
