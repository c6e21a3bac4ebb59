"""Latency first: bulk threads step aside while urgent work runs; the switch interval is shortened and restored."""

from __future__ import annotations

import sys
import threading
import time

from dirtylog.migration.engine.urgency import Urgency, short_switch_interval


def test_bulk_work_waits_while_urgent_work_runs_and_never_for_ever() -> None:
    urgency = Urgency()
    order: list[str] = []
    inside = threading.Event()
    release = threading.Event()

    def urgent() -> None:
        with urgency.urgent():
            inside.set()
            release.wait(5)
            order.append("urgent")

    thread = threading.Thread(target=urgent)
    thread.start()
    assert inside.wait(5)
    threading.Timer(0.05, release.set).start()
    urgency.yield_to_urgent(limit=5)
    order.append("bulk")
    thread.join()
    assert order == ["urgent", "bulk"]
    with urgency.urgent():
        began = time.monotonic()
        urgency.yield_to_urgent(limit=0.05)  # bounded: bulk work is never starved
        assert time.monotonic() - began < 1
    urgency.yield_to_urgent()  # nothing urgent: returns at once


def test_the_switch_interval_is_short_inside_and_restored_after_the_last_block() -> None:
    before = sys.getswitchinterval()
    with short_switch_interval(1e-4):
        assert sys.getswitchinterval() <= 1e-4 + 1e-9
        with short_switch_interval(1e-4):
            pass
        assert sys.getswitchinterval() <= 1e-4 + 1e-9  # still inside the outer block
    assert sys.getswitchinterval() == before
