"""Parsing of the comma-separated name lists the commands take (--designs, --paths, ...)."""

from __future__ import annotations

from kvmpoison.cli.errors import CliError


def pick(text: str | None, known: tuple[str, ...], what: str,
         default: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The names in ``text`` (``default``, else every known name, when it is None).

    An unknown or empty list is a :class:`CliError` naming the known ones.
    """
    if text is None:
        return known if default is None else default
    chosen = tuple(x.strip() for x in text.split(",") if x.strip())
    unknown = [x for x in chosen if x not in known]
    if unknown or not chosen:
        raise CliError(f"unknown {what} {', '.join(unknown) or repr(text)} "
                       f"(known: {', '.join(known)})")
    return chosen
