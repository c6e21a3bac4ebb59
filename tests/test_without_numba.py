"""dirtylog imports and migrates without Numba, as in the arm64 lab's guest (no Numba wheels there): the compiled
pieces load only where they run, and post-copy says why it serves faults in Python."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_dirtylog_imports_without_numba() -> None:
    code = textwrap.dedent("""
        import sys
        sys.modules["numba"] = None  # import numba now raises ImportError
        sys.modules["llvmlite"] = None
        import dirtylog
        from dirtylog.migration.engine import source, destination, postcopy_source, postcopy_destination
        from dirtylog.migration.engine.lanes import compiled_unavailable
        print(compiled_unavailable())
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("the compiled fault path needs Numba"), done.stdout
