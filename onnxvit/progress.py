"""Progress bars and one-line messages on stderr, silent with --quiet."""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class Reporter:
    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.console = Console(file=sys.stderr, quiet=quiet)

    def log(self, message: str) -> None:
        self.console.print(message, highlight=False, markup=False)

    @contextlib.contextmanager
    def task(self, description: str, total: int, live: bool = True) -> Iterator[Callable[[int], None]]:
        """A progress bar for ``total`` units; yields the function that advances it.

        ``live=False`` redraws only when advanced: no refresh thread competing with a timing loop.
        """
        if self.quiet:
            yield lambda n=1: None
            return
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=self.console, transient=False, auto_refresh=live) as progress:
            task_id = progress.add_task(description, total=total)
            yield lambda n=1: progress.update(task_id, advance=n, refresh=not live)
