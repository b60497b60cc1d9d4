"""What the command line shows besides its results: logs, progress and error lines, all on stderr.

Results (tables, summaries, the paths written) go to stdout, so ``jaxreg evaluate ... > report.txt``
keeps only them. On a terminal, logs go through rich's logging handler and long steps show a live
spinner or progress bar with the elapsed time and an ETA; anywhere else (a file, a pipe, a cluster
job's log) every message is one plain line, never wrapped or padded, and no live display is drawn.
``--quiet`` leaves errors and results only; ``--verbose`` adds the library's INFO logs, ``-vv`` DEBUG.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, SpinnerColumn, TextColumn,
                           TimeElapsedColumn)
from rich.text import Text

# soft_wrap: a long line is left to the terminal (or the log file) whole; markup and emoji off:
# paths and messages such as "jaxreg[ray]" or ":latest" are printed as they are
console = Console(stderr=True, soft_wrap=True, markup=False, emoji=False, highlight=False)

LIBRARY_LOGGER = "jaxreg"
_state = {"quiet": False}


def plural(count: int, word: str, words: str | None = None) -> str:
    """``plural(1, "pair")`` -> ``1 pair``; ``plural(2, "pair")`` -> ``2 pairs``."""
    return f"{count} {word if count == 1 else (words or word + 's')}"


def duration(seconds: float | None) -> str:
    """``4.2 s``, ``3 min 05 s``, ``1 h 02 min``; ``?`` when unknown."""
    if seconds is None:
        return "?"
    if seconds < 60:
        return f"{seconds:.1f} s"
    seconds = int(round(seconds))
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def error_line(message: str) -> None:
    """The one ``error:`` line of a command that cannot go on (plain, whatever stderr is)."""
    text = " ".join(str(message).split())  # one line, even if a library message held a newline
    sys.stderr.write(f"error: {text}\n")
    sys.stderr.flush()


def say(message: str | Text) -> None:
    """A progress or status line on stderr (nothing with --quiet)."""
    if not _state["quiet"]:
        console.print(message)


def warn(message: str) -> None:
    """A ``warning:`` line on stderr (nothing with --quiet, like the library's warnings)."""
    if not _state["quiet"]:
        console.print(Text(f"warning: {message}", style="yellow"))


@contextlib.contextmanager
def logging_to_stderr(verbose: int, quiet: bool) -> Iterator[None]:
    """Send the library's logs to stderr at the level the options ask for, for one command; the
    previous logging state comes back afterwards (the CLI can be called in-process, by tests)."""
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(max(verbose, 0), 2)]
    if console.is_terminal:
        handler: logging.Handler = RichHandler(console=console, show_time=False, show_path=verbose >= 2,
                                               markup=False, rich_tracebacks=False)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.setLevel(level)
    logger = logging.getLogger(LIBRARY_LOGGER)
    previous_level, previous_quiet = logger.level, _state["quiet"]
    logger.addHandler(handler)
    logger.setLevel(level)
    _state["quiet"] = quiet
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)
        _state["quiet"] = previous_quiet


# --------------------------------------------------------------------------------------------
# progress
# --------------------------------------------------------------------------------------------

class _EtaColumn(ProgressColumn):
    """``ETA 3 min 05 s``: the caller's estimate when it gives one (fields ``eta``, ``eta_at``),
    counted down since it was given, else rich's estimate from the speed so far; nothing until
    there is a basis for one."""

    def render(self, task) -> Text:
        if "eta" in task.fields:
            eta = max(0.0, task.fields["eta"] - (time.monotonic() - task.fields["eta_at"]))
        else:
            eta = task.time_remaining
        if task.finished or eta is None or task.completed == 0:
            return Text("")
        return Text(f"ETA {duration(eta)}", style="cyan")


def _progress(*columns) -> Progress:
    # transient: the bar disappears when done; the lines printed above it stay. On a file or pipe
    # nothing is drawn live, so only those lines appear. Results printed meanwhile are routed
    # above the bar only when stdout is the same terminal; a redirected stdout keeps them.
    live = console.is_terminal and not console.is_dumb_terminal and not _state["quiet"]
    return Progress(*columns, console=console, transient=True, disable=not live, refresh_per_second=8,
                    redirect_stdout=sys.stdout.isatty())


class Counter:
    """A progress bar over `total` items (pairs, pictures) with one line per finished item above it."""

    def __init__(self, progress: Progress, task):
        self._progress, self._task = progress, task

    def advance(self, line: str | Text | None = None, *, eta: float | None = None) -> None:
        """One item done: print its line (if any) above the bar; `eta`: the caller's estimate."""
        if line is not None:
            say(line)
        fields = {} if eta is None else {"eta": eta, "eta_at": time.monotonic()}
        self._progress.update(self._task, advance=1, **fields)


@contextlib.contextmanager
def counting(description: str, total: int) -> Iterator[Counter]:
    """``with counting("scoring", 13) as bar: ... bar.advance(line)`` (bar, M/N, elapsed, ETA)."""
    progress = _progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                         TimeElapsedColumn(), _EtaColumn())
    with progress:
        yield Counter(progress, progress.add_task(description, total=total))


class Steps:
    """The named steps of one long call (``steps("compiling")``), each shown while it runs with its
    elapsed time and, when done, as a line ``✓ compiling  4.1 s``. Pass an instance as a library
    ``progress=`` callback."""

    def __init__(self, progress: Progress):
        self._progress = progress
        self._current: tuple[str, object, float] | None = None
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str) -> None:
        self.done()
        self._current = (name, self._progress.add_task(name, total=None), time.perf_counter())

    def done(self, finished: bool = True) -> None:
        """Close the running step (called by the next step and at the end); a step that did not
        finish (an error) leaves no line: the error line says what happened."""
        if self._current is None:
            return
        name, task, start = self._current
        self._current = None
        self.seconds[name] = time.perf_counter() - start
        self._progress.remove_task(task)
        if finished:
            say(Text.assemble(("✓ ", "green"), f"{name:<24} {duration(self.seconds[name]):>8}"))


@contextlib.contextmanager
def steps() -> Iterator[Steps]:
    """``with steps() as step: library_call(progress=step)``; the last step closes on exit."""
    progress = _progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with progress:
        tracker = Steps(progress)
        try:
            yield tracker
        except BaseException:
            tracker.done(finished=False)
            raise
        tracker.done()


@contextlib.contextmanager
def status(description: str) -> Iterator[Callable[[str], None]]:
    """A spinner with the elapsed time while a call runs that reports in lines (``say`` each one)."""
    progress = _progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with progress:
        progress.add_task(description, total=None)
        yield say
