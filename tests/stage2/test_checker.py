"""The interleaving checker: the patch's order holds, every mutant is refuted with a readable trace."""

from __future__ import annotations

import pytest

from dirtylog.stage2.checker import CheckConfig, CheckConfigError, check
from dirtylog.stage2.mutants import MUTANTS, PATCH, UnknownMutantError, variant_named

# One vCPU over one bitmap word: small enough to exhaust in milliseconds, and still every race of the
# collector against a vCPU (read-then-clear needs two dirty pages in one word, which this has).
SMALL = CheckConfig(vcpus=1, pages=64, writes=3, collections=2)

EXPECTED_INVARIANT = {
    "skip-tlb-flush": "lost-write",
    "wp-before-snapshot": "lost-write",
    "clear-after-copy": "lost-write",
    "read-then-clear": "lost-write",
    "flush-before-wp": "lost-write",
    "no-buffer-memset": "phantom",
    "mark-before-map": "lost-write",
    "skip-initial-wp": "lost-write",
}


def test_the_patch_order_holds_on_the_default_configuration():
    result = check()
    assert result.ok and result.complete
    assert result.mode == "exhaustive"
    assert result.states > 10_000  # really explored: 2 vCPUs x 3 writes x 2 collections
    assert result.transitions >= result.states - 1
    assert result.schedules > 0  # terminal states were reached and checked for lost writes


@pytest.mark.parametrize(
    "config",
    [
        SMALL,
        CheckConfig(vcpus=3, pages=192, writes=1, collections=2),
        CheckConfig(vcpus=1, pages=128, writes=4, collections=3),  # pages in two words, three calls
    ],
)
def test_the_patch_order_holds_on_other_shapes(config):
    assert check(config).ok


def test_every_issue_mutant_is_listed():
    names = {mutant.name for mutant in MUTANTS}
    assert {"skip-tlb-flush", "wp-before-snapshot", "clear-after-copy", "read-then-clear", "flush-before-wp"} <= names
    assert set(EXPECTED_INVARIANT) == names


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name)
def test_every_mutant_is_refuted(mutant):
    result = check(SMALL, mutant)
    assert not result.ok
    counterexample = result.counterexample
    assert counterexample.invariant == EXPECTED_INVARIANT[mutant.name]
    assert [step.step for step in counterexample.trace] == list(range(1, len(counterexample.trace) + 1))
    assert {step.actor for step in counterexample.trace} <= {"vcpu0", "collector"}
    assert counterexample.trace[-1].actor == "collector"  # a copy reveals a phantom; the final call a loss


@pytest.mark.parametrize("name", ["skip-tlb-flush", "read-then-clear", "flush-before-wp"])
def test_mutants_are_refuted_on_the_default_configuration_too(name):
    result = check(variant=variant_named(name))
    assert not result.ok and result.counterexample.invariant == "lost-write"


def test_skip_tlb_flush_trace_shows_the_stale_entry_at_work():
    trace = check(SMALL, variant_named("skip-tlb-flush")).counterexample.trace
    protect = next(s.step for s in trace if "kvm_mmu_write_protect_pt_masked" in s.action and "-> ro" in s.change)
    copy = next(s.step for s in trace if "copy_to_user" in s.action)
    stale = [s for s in trace if s.step > copy and "TLB hit (rw)" in s.action and "store retires" in s.action]
    assert protect < copy and stale, "the lost write must go through a writable TLB entry after the copy"
    assert "unreported" in stale[0].change


def test_read_then_clear_trace_has_a_mark_between_read_and_clear():
    trace = check(SMALL, variant_named("read-then-clear")).counterexample.trace
    read = next(s.step for s in trace if "mask = dirty_bitmap[0]" in s.action)
    clear = next(s.step for s in trace if s.action.endswith("dirty_bitmap[0] = 0"))
    marks = [s.step for s in trace if "mark_page_dirty" in s.action]
    assert any(read < mark < clear for mark in marks)


def test_random_schedules_hold_for_the_patch_and_catch_a_mutant():
    large = CheckConfig(vcpus=4, pages=1024, writes=10, collections=4, random_schedules=100, seed=3)
    result = check(large)
    assert result.ok and result.mode == "random" and result.schedules == 100
    assert result.states > 1000
    broken = check(large, variant_named("skip-tlb-flush"))
    assert not broken.ok and broken.counterexample.invariant == "lost-write"


def test_random_schedules_are_reproducible_from_the_seed():
    config = CheckConfig(vcpus=2, pages=128, writes=4, collections=3, random_schedules=20, seed=7)
    first, second = check(config), check(config)
    assert (first.states, first.transitions) == (second.states, second.transitions)


def test_json_form_of_a_result():
    data = check(SMALL, variant_named("no-buffer-memset")).to_json()
    assert data["verdict"] == "counterexample" and data["variant"] == "no-buffer-memset"
    assert data["config"]["vcpus"] == 1
    assert data["counterexample"]["invariant"] == "phantom"
    assert set(data["counterexample"]["trace"][0]) == {"step", "actor", "action", "change"}


def test_bad_configurations_and_names_are_explained():
    with pytest.raises(CheckConfigError, match="at least 1 collection"):
        CheckConfig(collections=0)
    with pytest.raises(CheckConfigError, match="cannot give each of 4 vCPUs"):
        CheckConfig(vcpus=4, pages=3)
    with pytest.raises(UnknownMutantError, match="choose one of skip-tlb-flush"):
        variant_named("nope")
    assert variant_named(None) is PATCH and variant_named("patch") is PATCH
