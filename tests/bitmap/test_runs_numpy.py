"""The NumPy runs path (used where Numba is absent, as in the arm64 lab) agrees with the compiled kernel."""

from __future__ import annotations

import numpy as np
import pytest

from dirtylog.bitmap import _runs_numpy


@pytest.mark.parametrize("density", [0.0, 0.001, 0.3, 0.97, 1.0])
def test_numpy_runs_equal_the_compiled_kernel(density: float) -> None:
    compiled = pytest.importorskip("dirtylog.bitmap._runs", reason="Numba is not installed")
    rng = np.random.default_rng(int(density * 1000))
    words = np.packbits(rng.random(64 * 500) < density, bitorder="little").view(np.uint64)
    expected, got = compiled.runs(words), _runs_numpy.runs(words)
    for want, have in zip(expected, got, strict=True):
        assert have.dtype == np.int64
        np.testing.assert_array_equal(have, want)


def test_runs_cross_word_boundaries() -> None:
    words = np.array([1 << 63, 0b111, 0, 1 << 5], dtype=np.uint64)
    starts, lengths = _runs_numpy.runs(words)
    assert starts.tolist() == [63, 64 * 3 + 5] and lengths.tolist() == [4, 1]
