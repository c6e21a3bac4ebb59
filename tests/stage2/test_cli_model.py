"""``dirtylog model check`` and ``dirtylog model mutants`` through the real entry point."""

from __future__ import annotations

import json

from dirtylog.cli import main
from dirtylog.stage2.mutants import MUTANTS

SMALL = ["--vcpus", "1", "--pages", "64", "--writes", "3", "--collections", "2"]


def _json(capsys):
    out = capsys.readouterr().out
    assert out.count("\n") == 1, "--json prints exactly one JSON object"
    return json.loads(out)


def test_check_the_patch_exits_0_with_its_numbers(capsys):
    assert main(["model", "check", "--json"]) == 0
    data = _json(capsys)
    assert data["verdict"] == "ok" and data["variant"] == "patch" and data["mode"] == "exhaustive"
    assert data["config"] == {
        "vcpus": 2,
        "pages": 128,
        "writes": 3,
        "collections": 2,
        "random_schedules": 0,
        "seed": 0,
        "max_states": 5_000_000,
    }
    assert data["states"] > 10_000 and data["states_per_second"] > 0 and data["seconds"] > 0
    assert data["counterexample"] is None


def test_check_a_mutant_exits_1_with_its_trace(capsys):
    assert main(["model", "check", "--mutant", "clear-after-copy", "--json", *SMALL]) == 1
    data = _json(capsys)
    assert data["verdict"] == "counterexample"
    counterexample = data["counterexample"]
    assert counterexample["invariant"] == "lost-write" and "never reported" in counterexample["detail"]
    actions = [step["action"] for step in counterexample["trace"]]
    assert any("memset(dirty_bitmap, 0, n)" in action for action in actions)  # the moved clear is in the trace


def test_human_output_shows_verdict_and_trace(capsys):
    assert main(["model", "check", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "invariants hold" in out and "states/s" in out and "exhaustive" in out
    assert main(["model", "check", "--mutant", "skip-tlb-flush", *SMALL]) == 1
    out = capsys.readouterr().out
    assert "counterexample found" in out and "lost-write" in out
    assert "kvm_tlb_flush_vmid" in out  # the change is shown
    assert "collector" in out and "vcpu0" in out


def test_random_schedules(capsys):
    args = [
        "model",
        "check",
        "--json",
        "--vcpus",
        "4",
        "--pages",
        "512",
        "--writes",
        "8",
        "--collections",
        "3",
        "--random-schedules",
        "40",
        "--seed",
        "5",
    ]
    assert main(args) == 0
    data = _json(capsys)
    assert data["mode"] == "random" and data["schedules"] == 40 and data["config"]["seed"] == 5


def test_mutants_lists_every_mutant(capsys):
    assert main(["model", "mutants", "--json"]) == 0
    data = _json(capsys)
    assert [m["name"] for m in data["mutants"]] == [m.name for m in MUTANTS]
    assert all(m["summary"] and m["change"] for m in data["mutants"])
    assert main(["model", "mutants"]) == 0
    out = capsys.readouterr().out
    assert all(mutant.name in out for mutant in MUTANTS)


def test_unknown_mutant_is_an_error_naming_the_choices(capsys):
    assert main(["model", "check", "--mutant", "no-such-thing"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dirtylog: error: unknown mutant 'no-such-thing'") and "skip-tlb-flush" in err


def test_model_without_an_action_prints_help(capsys):
    assert main(["model"]) == 2
    assert "check" in capsys.readouterr().out
