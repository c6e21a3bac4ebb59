"""PNG timelines for people (``--plot FILE.png``), drawn with matplotlib's headless Agg backend."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from dirtylog.errors import DirtylogError


class PlotError(DirtylogError):
    """A plot that could not be written."""


def _check_path(path: str) -> None:
    if not path.lower().endswith(".png"):
        raise PlotError(f"plot file {path!r} must end in .png")
    if not Path(path).resolve().parent.is_dir():
        raise PlotError(f"cannot write plot {path!r}: its folder does not exist")


def plot_series(path: str, title: str, x: Sequence[float], xlabel: str,
                series: Sequence[tuple[str, Sequence[float], str]]) -> None:
    """One panel per ``(label, values, unit)`` series, sharing the x axis; written to ``path``."""
    _check_path(path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(series), 1, sharex=True, figsize=(9, 2.4 * len(series) + 0.6), squeeze=False)
    for axis, (label, values, unit) in zip(axes[:, 0], series, strict=True):
        axis.plot(list(x), list(values), marker="o", markersize=3, linewidth=1.2)
        axis.set_ylabel(f"{label}\n({unit})")
        axis.grid(True, alpha=0.3)
    axes[-1, 0].set_xlabel(xlabel)
    figure.suptitle(title)
    figure.tight_layout()
    try:
        figure.savefig(path, dpi=110)
    except OSError as error:
        raise PlotError(f"cannot write plot {path!r}: {error.strerror}") from None
    finally:
        plt.close(figure)


def plot_heatmap(path: str, title: str, x: Sequence[float], rows: Sequence[str], cells: npt.NDArray[np.int64],
                 series: Sequence[tuple[str, Sequence[float], str]]) -> None:
    """A heatmap of ``cells`` (one row per name in ``rows``, one column per x) under line panels of ``series``:
    dirty pages by mapping and time, with the totals above. Colours are logarithmic (1 page to the most)."""
    _check_path(path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    heights = [1.6] * len(series) + [max(2.0, 0.28 * len(rows))]
    figure, axes = plt.subplots(len(series) + 1, 1, sharex=True, figsize=(11, sum(heights) + 0.8),
                                gridspec_kw={"height_ratios": heights}, squeeze=False)
    for axis, (label, values, unit) in zip(axes[:-1, 0], series, strict=True):
        axis.plot(list(x), list(values), linewidth=1.2)
        axis.set_ylabel(f"{label}\n({unit})")
        axis.grid(True, alpha=0.3)
    heat = axes[-1, 0]
    edges = np.concatenate([[0.0], np.asarray(x, dtype=float)])
    masked = np.ma.masked_less_equal(cells, 0)
    mesh = heat.pcolormesh(edges, np.arange(len(rows) + 1), masked, cmap="viridis", shading="flat",
                           norm=LogNorm(vmin=1, vmax=max(1, int(cells.max(initial=1)))))
    heat.set_yticks(np.arange(len(rows)) + 0.5, labels=list(rows), fontsize=7)
    heat.invert_yaxis()
    heat.set_xlabel("seconds")
    figure.colorbar(mesh, ax=list(axes[:, 0]), label="dirty pages", pad=0.01)  # all panels keep one width
    figure.suptitle(title)
    try:
        figure.savefig(path, dpi=110, bbox_inches="tight")
    except OSError as error:
        raise PlotError(f"cannot write plot {path!r}: {error.strerror}") from None
    finally:
        plt.close(figure)


def plot_faults(path: str, starts: Sequence[float], counts: Sequence[int], histogram: Sequence[int],
                width_ms: float) -> None:
    """Post-copy's page faults over time (one bar per ``width_ms``) above their latency histogram (QEMU's
    power-of-two microsecond buckets)."""
    _check_path(path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (timeline, latency) = plt.subplots(2, 1, figsize=(9, 5.4))
    timeline.bar(list(starts), list(counts), width=width_ms / 1e3, align="edge")
    timeline.set_xlabel("seconds since the switch-over")
    timeline.set_ylabel(f"faults\n(per {width_ms:g} ms)")
    timeline.grid(True, alpha=0.3)
    labels = [f"{1 << n}" if n < 10 else f"{(1 << n) / 1000:g}m" for n in range(len(histogram))]
    latency.bar(range(len(histogram)), list(histogram))
    latency.set_xticks(range(len(histogram)), labels=labels, fontsize=7)
    latency.set_xlabel("fault latency, from (us; m: ms)")
    latency.set_ylabel("faults")
    latency.grid(True, alpha=0.3)
    figure.suptitle("post-copy page faults")
    figure.tight_layout()
    try:
        figure.savefig(path, dpi=110)
    except OSError as error:
        raise PlotError(f"cannot write plot {path!r}: {error.strerror}") from None
    finally:
        plt.close(figure)
