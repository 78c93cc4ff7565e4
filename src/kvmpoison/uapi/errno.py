"""errno values: the stdlib's, plus those Python does not name.

Follows ``include/uapi/asm-generic/errno-base.h`` and ``errno.h``. Python's
``errno`` module lacks ``EHWPOISON`` (133, "Memory page has hardware error").
"""

from __future__ import annotations

import errno as _std

EHWPOISON = 133

_EXTRA = {EHWPOISON: "EHWPOISON"}
# Where Python's errorcode picks an alias, use the name the kernel's headers use first.
_KERNEL_NAMES = {_std.EOPNOTSUPP: "EOPNOTSUPP", _std.EAGAIN: "EAGAIN", _std.EDEADLK: "EDEADLK"}


def errno_name(value: int) -> str:
    """``EFAULT`` for 14, ``EHWPOISON`` for 133; the number itself if unknown."""
    return (_KERNEL_NAMES.get(value) or _std.errorcode.get(value) or _EXTRA.get(value)
            or str(value))


def errno_value(name: str) -> int | None:
    """The number of an errno name, or None if it is not one."""
    for value, known in _EXTRA.items():
        if known == name:
            return value
    found: object = getattr(_std, name, None)
    return found if isinstance(found, int) and name.startswith("E") else None
