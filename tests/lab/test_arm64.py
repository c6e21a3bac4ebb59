"""End to end on arm64: dirtylog boots under QEMU's EL2 emulation and proves dirty logging lossless there.

Marked ``arm64``; runs by default and skips only where qemu-system-aarch64 is missing (.ci/run installs
it). The first run downloads the environment into the cache (~100 MB from the registries); later runs boot
from it. One boot runs the lossless proof in log and clear modes with two concurrent vCPUs.
"""

from __future__ import annotations

import io
import shutil

import pytest

from dirtylog.lab import environment, qemu

pytestmark = [
    pytest.mark.arm64,
    pytest.mark.skipif(shutil.which(qemu.QEMU) is None,
                       reason=f"{qemu.QEMU} is not installed (apt-get install qemu-system-arm)"),
]

TRACK = "dirtylog track --verify --memory 64M --vcpus 2 --duration 2s --interval 100ms --json"


def test_the_lossless_proof_passes_on_arm64_kvm() -> None:
    built = environment.build("debian12", progress=False)
    output = io.StringIO()
    script = f"uname -m; {TRACK} --mode log | tail -1; {TRACK} --mode clear | tail -1; exit 7"
    status = qemu.run(built, ["sh", "-c", script], qemu.BootOptions(timeout=300), output=output)
    lines = output.getvalue().splitlines()
    assert status == 7, lines[-10:]  # the command's own exit status comes back
    assert lines[0] == "aarch64"
    summaries = [line for line in lines if line.startswith('{"summary"')]
    assert len(summaries) == 2, lines[-10:]
    for summary in summaries:
        assert '"verified":true' in summary and '"changes_seen":0' not in summary, summary


def test_ring_mode_and_the_model_against_the_kernel_on_debian13() -> None:
    """Debian 13's kernel (6.12) offers the dirty ring on arm64: the lossless proof in ring mode, and one schedule
    run both in the stage-2 model and on the kernel gives the same dirty sets and the same counts of what the
    seed patch's functions do (pages logged, bitmap words re-protected, write-protect walks)."""
    import json

    built = environment.build("debian13", progress=False)
    output = io.StringIO()
    script = f"{TRACK} --mode ring | tail -1; dirtylog model compare --json | tail -1"
    status = qemu.run(built, ["sh", "-c", script], qemu.BootOptions(timeout=300), output=output)
    lines = output.getvalue().splitlines()
    assert status == 0, lines[-10:]
    (ring,) = [line for line in lines if line.startswith('{"summary"')]
    assert '"verified":true' in ring and '"changes_seen":0' not in ring, ring
    compare = json.loads(next(line for line in reversed(lines) if line.startswith('{"kernel"')))
    assert compare["kernel"].startswith("6.12") and compare["same_dirty_sets"] is True
    for count in ("pages logged", "bitmap words re-protected", "write-protect walks"):
        model, kernel = compare["totals"][count]
        assert model == kernel and model > 0, (count, model, kernel)
