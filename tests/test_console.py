"""The tasks' console: plain lines without loading rich, rich when something needs it."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60)


def test_plain_lines_are_written_without_rich_and_markup_loads_it() -> None:
    proc = _run("""
        import io, sys
        from trainstack.console import LazyConsole
        out = io.StringIO()
        console = LazyConsole(file=out)
        console.print("synced [3 files] via tar", markup=False, highlight=False)
        assert not console.is_terminal
        assert "rich" not in sys.modules, "a plain line loaded rich"
        console.print("[bold]done[/bold]")
        assert "rich.console" in sys.modules
        console.print("after [x]", markup=False, highlight=False)
        print(repr(out.getvalue()))
    """)
    assert proc.returncode == 0, proc.stderr
    # Markup is rendered by rich (no tags left), plain text is kept as written.
    assert proc.stdout.strip() == repr("synced [3 files] via tar\ndone\nafter [x]\n")


def test_terminal_detection_follows_rich_without_loading_it() -> None:
    proc = _run("""
        import os, sys
        from trainstack.console import LazyConsole

        class Tty:
            def isatty(self): return True
            def write(self, text): return len(text)
            def flush(self): pass

        assert LazyConsole(file=Tty()).is_terminal
        assert "rich" not in sys.modules
        os.environ["TTY_COMPATIBLE"] = "0"  # rich's own override: asked, and answered by rich
        assert not LazyConsole(file=Tty()).is_terminal
        assert "rich.console" in sys.modules
    """)
    assert proc.returncode == 0, proc.stderr
