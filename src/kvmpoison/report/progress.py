"""A progress bar on stderr for the slow commands, only when stderr is a terminal.

Pipes, files and ``--format json`` output stay clean: off a terminal the bar
is a no-op. The bar is transient, so it leaves nothing behind when done.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

Tick = Callable[[], None]


def _noop() -> None:
    return None


@contextmanager
def progress(total: int, what: str, stream: TextIO | None = None) -> Iterator[Tick]:
    """Yield a function to call once per finished item of ``total``."""
    out = stream if stream is not None else sys.stderr
    isatty = getattr(out, "isatty", None)
    if total <= 0 or not (callable(isatty) and isatty()):
        yield _noop
        return
    from rich.console import Console  # only to draw: a bar off a terminal never loads rich
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    console = Console(file=out, force_terminal=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task(what, total=total)

        def tick() -> None:
            bar.advance(task)

        yield tick
