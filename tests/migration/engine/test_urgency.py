"""Latency first: bulk threads step aside while urgent work runs; the switch interval is shortened and restored."""

from __future__ import annotations

import os
import sys
import threading
import time

from dirtylog.migration.engine.urgency import URGENT_NICE, Urgency, raise_thread_priority, short_switch_interval


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


def test_the_urgent_thread_alone_gets_the_lower_nice_value() -> None:
    seen: dict[str, int] = {}

    def urgent() -> None:
        raised = raise_thread_priority()
        seen["raised"] = int(raised)
        seen["urgent"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    thread = threading.Thread(target=urgent)
    thread.start()
    thread.join()
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before  # this thread kept its own
    if os.geteuid() == 0:
        assert seen == {"raised": 1, "urgent": URGENT_NICE}
    else:  # without CAP_SYS_NICE a lower value is refused, and nothing else changes
        assert seen["urgent"] == before or seen["raised"]
