"""The ``kvmpoison`` command line."""

from __future__ import annotations

import sys

import typer

from kvmpoison.cli import bench, demo, matrix, oracle, pte, run
from kvmpoison.cli.errors import CliError

app = typer.Typer(
    name="kvmpoison",
    help="Model of 'KVM: unmap guest memory using poisoned pages': try it, attack it, check it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("bench")(bench.bench)
app.command("demo")(demo.demo)
app.command("matrix")(matrix.matrix)
app.command("oracle")(oracle.oracle)
app.command("run")(run.run)
app.add_typer(pte.app, name="pte")


def main(argv: list[str] | None = None) -> int:
    """Entry point: usage errors and bad values become one line on stderr and exit 2."""
    try:
        result = app(args=argv, prog_name="kvmpoison", standalone_mode=False)
    except CliError as exc:
        print(f"kvmpoison: error: {exc}", file=sys.stderr)
        return 2
    except typer.TyperException as exc:
        message = " ".join(exc.format_message().split())
        print(f"kvmpoison: error: {message}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 2)) or 2
    except typer.Abort:
        print("kvmpoison: aborted", file=sys.stderr)
        return 1
    return result if isinstance(result, int) else 0


def entry() -> None:
    sys.exit(main())
