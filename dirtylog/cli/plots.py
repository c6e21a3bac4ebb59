"""PNG timelines for people (``--plot FILE.png``), drawn with matplotlib's headless Agg backend."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dirtylog.errors import DirtylogError


class PlotError(DirtylogError):
    """A plot that could not be written."""


def plot_series(path: str, title: str, x: Sequence[float], xlabel: str,
                series: Sequence[tuple[str, Sequence[float], str]]) -> None:
    """One panel per ``(label, values, unit)`` series, sharing the x axis; written to ``path``."""
    if not path.lower().endswith(".png"):
        raise PlotError(f"plot file {path!r} must end in .png")
    if not Path(path).resolve().parent.is_dir():
        raise PlotError(f"cannot write plot {path!r}: its folder does not exist")
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
