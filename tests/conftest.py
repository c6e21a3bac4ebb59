"""Test-suite wiring: real-KVM tests run where /dev/kvm works and skip with the reason elsewhere;
the summary says how many of them ran."""

from __future__ import annotations

import collections
import functools

import pytest

from dirtylog.errors import DirtylogError


@functools.cache
def kvm_unavailable_reason() -> str | None:
    """Why real KVM tests cannot run here, or None when they can."""
    from dirtylog.kvm.system import Kvm

    try:
        Kvm().close()
    except DirtylogError as error:
        return str(error)
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = kvm_unavailable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"real KVM unavailable: {reason}")
    for item in items:
        if item.get_closest_marker("kvm") is not None:
            item.add_marker(skip)


_kvm_outcomes: collections.Counter[str] = collections.Counter()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    # Count real-KVM tests by what happened to them, for the summary line CI prints.
    outcome = yield
    report = outcome.get_result()
    counted = report.when == "call" or (report.when == "setup" and report.skipped)
    if counted and item.get_closest_marker("kvm") is not None:
        _kvm_outcomes[report.outcome] += 1


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    counts = ", ".join(f"{n} {outcome}" for outcome, n in sorted(_kvm_outcomes.items())) or "none collected"
    reason = kvm_unavailable_reason()
    terminalreporter.write_sep("=", f"real KVM tests: {counts}" + (f" (skipped: {reason})" if reason else ""))
