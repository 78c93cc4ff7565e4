"""The ``kvmpoison`` command line.

Start-up is part of every command's cost, so the command line loads only the
command it runs (all of them for help and errors), and numpy's BLAS runs one
thread: the model never calls BLAS, and a pool of idle BLAS threads costs
about 0.08 s of CPU at import.
"""

from __future__ import annotations

import os

# Before anything imports numpy (the package's __init__ does not). A user's setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import importlib
import sys
import traceback
from pathlib import Path
from typing import Any, TextIO, cast

import typer

from kvmpoison.cli.errors import CliError

# Each command: its module and the function (or, for ``pte``, the Typer group) it is.
COMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("kvmpoison.cli.bench", "bench"),
    "demo": ("kvmpoison.cli.demo", "demo"),
    "explore": ("kvmpoison.cli.explore", "explore"),
    "matrix": ("kvmpoison.cli.matrix", "matrix"),
    "oracle": ("kvmpoison.cli.oracle", "oracle"),
    "run": ("kvmpoison.cli.run", "run"),
    "report": ("kvmpoison.cli.report", "report"),
    "pte": ("kvmpoison.cli.pte", "app"),
}
GROUPS = frozenset({"pte"})


def make_app(names: list[str] | None = None) -> typer.Typer:
    """The command line with the commands ``names`` (default: every command)."""
    cli = typer.Typer(
        name="kvmpoison",
        help="Model of 'KVM: unmap guest memory using poisoned pages': try it, attack it, "
             "check it.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )
    # A group even with one command registered, exactly as with all of them.
    cli.callback()(_group)
    for name in COMMANDS if names is None else names:
        module, attr = COMMANDS[name]
        obj = getattr(importlib.import_module(module), attr)
        if name in GROUPS:
            cli.add_typer(obj, name=name)
        else:
            cli.command(name)(obj)
    return cli


def _group() -> None:
    return None


def app_for(argv: list[str]) -> typer.Typer:
    """Only the command ``argv`` starts with, when it names one; else every command."""
    if argv and argv[0] in COMMANDS:
        return make_app([argv[0]])
    return make_app()


def _commands(argv: list[str]) -> str:
    """The sub-commands of the group ``argv`` names (the top level, or ``pte``)."""
    group: Any = typer.main.get_command(make_app())
    for word in argv:
        group = getattr(group, "commands", {}).get(word, group)
    return ", ".join(sorted(getattr(group, "commands", {})))


def main(argv: list[str] | None = None) -> int:
    """Entry point: usage errors and bad values become one line on stderr and exit 2."""
    args = sys.argv[1:] if argv is None else argv
    try:
        result = app_for(args)(args=args, prog_name="kvmpoison", standalone_mode=False)
    except CliError as exc:
        print(f"kvmpoison: error: {exc}", file=sys.stderr)
        return 2
    except typer.TyperException as exc:
        message = " ".join(exc.format_message().split())
        if not message:  # no_args_is_help: the help went to stdout; say what is missing
            message = f"no command given (one of: {_commands(args)})"
        print(f"kvmpoison: error: {message}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 2)) or 2
    except typer.Abort:
        print("kvmpoison: aborted", file=sys.stderr)
        return 1
    except (ReaderGoneError, KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # a bug of the model itself: one line, not a traceback
        if os.environ.get("KVMPOISON_TRACEBACK"):
            raise
        where = traceback.extract_tb(exc.__traceback__)[-1]
        print(f"kvmpoison: internal error (a bug of the model, not of your input): "
              f"{type(exc).__name__}: {exc} at {Path(where.filename).name}:{where.lineno}; "
              "KVMPOISON_TRACEBACK=1 shows the traceback", file=sys.stderr)
        return EX_SOFTWARE
    return result if isinstance(result, int) else 0


EX_SOFTWARE = 70  # sysexits.h: an internal software error


class ReaderGoneError(Exception):
    """stdout's reader closed the pipe (not an OSError, so click does not turn it into exit 1)."""


class _PipeGuard:
    """sys.stdout, with EPIPE raised as ReaderGoneError."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            raise ReaderGoneError from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            raise ReaderGoneError from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def entry() -> None:
    real = sys.stdout
    sys.stdout = cast(TextIO, _PipeGuard(real))
    try:
        rc = main()
        sys.stdout.flush()
    except ReaderGoneError:
        # The reader went away (``| head``) after taking what it wanted: not an error. Point
        # stdout at /dev/null so the interpreter's last flush does not fail as well.
        os.dup2(os.open(os.devnull, os.O_WRONLY), real.fileno())
        rc = 0
    finally:
        sys.stdout = real
    sys.exit(rc)
