"""CLI error handling: every bad input ends as one line on stderr and exit 2."""

from __future__ import annotations

import enum


class CliError(Exception):
    """A user error the CLI reports in one line with exit status 2."""


class Format(enum.Enum):
    TABLE = "table"
    JSON = "json"
    MD = "md"


def parse_int(text: str, what: str) -> int:
    """Parse ``0x...``/decimal/``0b...`` integers, with a clear error."""
    try:
        return int(text.replace("_", ""), 0)
    except ValueError:
        raise CliError(f"{what} {text!r} is not an integer (use decimal or 0x hex)") from None
