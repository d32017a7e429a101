"""Progress bars for long work (probe, gradcheck, many targets), on stderr only.

    from gradaudit.progress import progress

    with progress(len(targets), "auditing") as step:
        for t in targets:
            ...
            step()               # one unit done
            step(2, "conv1")     # or: two units, and say what is being worked on

A rich progress bar is drawn on stderr when stderr is a terminal; otherwise (pipes,
CI logs, files, ``--format json`` captured by a tool) nothing at all is written and
``step`` does nothing. ``GRADAUDIT_NO_PROGRESS=1`` turns the bar off everywhere.
Machine output on stdout is never touched.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Callable, Iterator, TextIO

Step = Callable[..., None]


def enabled(stream: TextIO | None = None) -> bool:
    """Whether a bar would be shown on ``stream`` (default: stderr)."""
    stream = stream if stream is not None else sys.stderr
    if os.environ.get("GRADAUDIT_NO_PROGRESS"):
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _noop(advance: float = 1, description: str | None = None) -> None:
    return None


@contextmanager
def progress(total: float | None, label: str, *, stream: TextIO | None = None) -> Iterator[Step]:
    """Yield ``step(advance=1, description=None)``; draws a bar only on a terminal.

    ``total`` may be ``None`` when the amount of work is unknown (a spinner is shown).
    """
    stream = stream if stream is not None else sys.stderr
    if not enabled(stream):
        yield _noop
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console(file=stream, stderr=stream is sys.stderr)
    columns = [SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(label, total=total)

        def step(advance: float = 1, description: str | None = None) -> None:
            if description is None:
                bar.advance(task, advance)
            else:
                bar.update(task, advance=advance, description=f"{label}: {description}")

        yield step
