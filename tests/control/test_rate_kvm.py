"""QEMU's dirty-rate and dirty-limit commands on real KVM, through qemu.qmp's synchronous client."""

from __future__ import annotations

import time
from typing import Any

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from tests.control.conftest import Monitors, error_of, running_machine

pytestmark = pytest.mark.kvm

GUEST_PAGES_PER_S = 2 * 20_000  # running_machine(): 2 vCPUs at 20,000 pages/s, random pages of 128 MiB
PAGES_PER_MB = 256


def measured(client: QEMUMonitorProtocol, **arguments: Any) -> dict[str, Any]:
    client.cmd("calc-dirty-rate", **arguments)
    deadline = time.monotonic() + 30
    while (info := client.cmd("query-dirty-rate"))["status"] == "measuring":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert isinstance(info, dict)
    return info


def guest_rate(client: QEMUMonitorProtocol, seconds: float = 1.0) -> float:
    before = client.cmd("x-dirtylog-query-progress")["progress"]
    time.sleep(seconds)
    return float(client.cmd("x-dirtylog-query-progress")["progress"] - before) / seconds


def test_calc_dirty_rate_measures_what_the_guest_writes(monitors: Monitors) -> None:
    _, client = monitors("vm", machine=running_machine(ring=True))
    assert client.cmd("query-dirty-rate")["status"] == "unstarted"
    sampled = measured(client, **{"calc-time": 1})
    assert sampled["mode"] == "page-sampling" and sampled["sample-pages"] == 512 and sampled["calc-time"] == 1
    assert "vcpu-dirty-rate" not in sampled
    ring = measured(client, **{"calc-time": 500, "calc-time-unit": "millisecond", "mode": "dirty-ring"})
    assert ring["calc-time"] == 500 and ring["calc-time-unit"] == "millisecond"
    assert client.cmd("query-dirty-rate", **{"calc-time-unit": "second"})["calc-time"] == 0
    # Random pages of a 128 MiB area at 40,000 writes/s: nearly every write a new page in a short window.
    expected = GUEST_PAGES_PER_S / PAGES_PER_MB
    for info in (sampled, ring):
        assert info["status"] == "measured" and 0.4 * expected < info["dirty-rate"] < 1.2 * expected, info
    assert [v["id"] for v in ring["vcpu-dirty-rate"]] == [0, 1]
    assert sum(v["dirty-rate"] for v in ring["vcpu-dirty-rate"]) >= ring["dirty-rate"] - 2
    assert error_of(client, "calc-dirty-rate", **{"calc-time": 1, "mode": "dirty-bitmap"}) == \
        "mode dirty-bitmap is not enabled, use other method instead."
    assert error_of(client, "calc-dirty-rate", **{"calc-time": 61}) == \
        "Calculation time is out of range [50ms, 60000ms]."
    assert error_of(client, "calc-dirty-rate", **{"calc-time": 1, "sample-pages": 64}) == \
        "sample-pages is out of range[128, 4096]."
    assert error_of(client, "calc-dirty-rate", **{"calc-time": 1, "mode": "dirty-ring", "sample-pages": 512}) == \
        "sample-pages is used only in page-sampling mode"
    client.cmd("calc-dirty-rate", **{"calc-time": 1})
    assert error_of(client, "calc-dirty-rate", **{"calc-time": 1}) == "the dirty rate is already being measured."


def test_a_vcpu_dirty_limit_slows_the_guest_until_cancelled(monitors: Monitors) -> None:
    _, client = monitors("vm", machine=running_machine(ring=True))
    assert client.cmd("query-vcpu-dirty-limit") == []
    free = guest_rate(client)
    client.cmd("set-vcpu-dirty-limit", **{"dirty-rate": 10})  # 2,560 pages/s per vCPU
    time.sleep(0.3)
    limited = guest_rate(client)
    assert limited < 0.5 * free and limited < 2 * 2 * 10 * PAGES_PER_MB, (free, limited)
    limits = client.cmd("query-vcpu-dirty-limit")
    assert [(v["cpu-index"], v["limit-rate"]) for v in limits] == [(0, 10), (1, 10)]
    assert all(isinstance(v["current-rate"], int) and v["current-rate"] >= 0 for v in limits)
    assert "dirty log is in use" in error_of(client, "migrate", uri="tcp:127.0.0.1:1")
    client.cmd("cancel-vcpu-dirty-limit", **{"cpu-index": 1})
    assert [v["limit-rate"] for v in client.cmd("query-vcpu-dirty-limit")] == [10, 0]
    client.cmd("set-vcpu-dirty-limit", **{"dirty-rate": 0})  # 0 lifts the cap, as in QEMU
    assert client.cmd("query-vcpu-dirty-limit") == []
    assert guest_rate(client) > 2 * limited
    assert error_of(client, "set-vcpu-dirty-limit", **{"dirty-rate": 10, "cpu-index": 2}) == \
        "incorrect cpu index specified"


def test_the_dirty_limit_needs_dirty_rings(monitors: Monitors) -> None:
    _, client = monitors("vm", machine=running_machine())
    assert "requires KVM with accelerator property 'dirty-ring-size'" in error_of(
        client, "set-vcpu-dirty-limit", **{"dirty-rate": 10})
    assert client.cmd("cancel-vcpu-dirty-limit") == {}
    assert client.cmd("query-vcpu-dirty-limit") == []
    assert "mode dirty-ring is not enabled" in error_of(client, "calc-dirty-rate", **{"calc-time": 1,
                                                                                     "mode": "dirty-ring"})
