"""Progress bars on stderr for the long steps (calibration passes, latency measurements, sweeps).

Never on stdout, so JSON output stays one document; a no-op object when disabled.
"""

from __future__ import annotations


def progress(enabled: bool):
    """A rich progress bar on stderr with elapsed time and an ETA (a no-op object when disabled)."""
    if not enabled:
        return NoProgress()
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("eta"), TimeRemainingColumn(), console=Console(stderr=True, force_terminal=True),
                    transient=True)


class NoProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *a, **k):
        return 0

    def advance(self, *a, **k):
        pass

    def update(self, *a, **k):
        pass


__all__ = ["NoProgress", "progress"]
