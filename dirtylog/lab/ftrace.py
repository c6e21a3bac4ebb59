"""Counting kernel function calls with ftrace's function tracer (tracefs), for the model-against-kernel check.

Only functions the kernel can trace are counted (``available_filter_functions``: an inlined or ``notrace``
function is not there, and :meth:`FunctionCounter.missing` names them). Counting is the trace's lines per
function; the buffer is cleared between phases, and an overrun would be reported, not hidden.
"""

from __future__ import annotations

import collections
import re
from pathlib import Path

from dirtylog.lab.errors import LabError

TRACEFS = Path("/sys/kernel/tracing")
_LINE = re.compile(r"\s(\S+?)(?:\.(?:isra|constprop|part)\.\d+)*\s+<-")


class FunctionCounter:
    """The function tracer filtered to ``functions``; :meth:`take` returns and clears the counts."""

    def __init__(self, functions: list[str], root: Path = TRACEFS) -> None:
        if not (root / "available_filter_functions").exists():
            raise LabError(f"{root} has no function tracer (is tracefs mounted, CONFIG_FUNCTION_TRACER set?)")
        self.root = root
        available = set()
        for line in (root / "available_filter_functions").read_text().splitlines():
            available.add(line.split()[0])
        self.functions = [name for name in functions if name in available]
        self.missing = [name for name in functions if name not in available]
        self._write("tracing_on", "0")
        self._write("current_tracer", "nop")
        self._write("buffer_size_kb", "8192")
        self._write("set_ftrace_filter", " ".join(self.functions) or "__no_such_function__")
        self._write("trace", "")
        self._write("current_tracer", "function")
        self._write("tracing_on", "1")

    def _write(self, name: str, value: str) -> None:
        (self.root / name).write_text(value + "\n")

    def take(self) -> dict[str, int]:
        """Calls of each function since the last take (0 for those never called)."""
        self._write("tracing_on", "0")
        counts: collections.Counter[str] = collections.Counter()
        text = (self.root / "trace").read_text()
        if "LOST" in text.split("\n# ", 1)[0]:
            raise LabError("the ftrace buffer overran; counts would be short")
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            match = _LINE.search(line)
            if match:
                counts[match.group(1)] += 1
        self._write("trace", "")
        self._write("tracing_on", "1")
        return {name: counts.get(name, 0) for name in self.functions}

    def close(self) -> None:
        """Switch the tracer off."""
        self._write("tracing_on", "0")
        self._write("current_tracer", "nop")
        self._write("set_ftrace_filter", "")
