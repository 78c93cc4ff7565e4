"""What the running kernel offers, found by reading files only.

Nothing here changes host state: no madvise, no sysfs writes, no probe that
could take a page out of service. ``/dev/kvm`` is opened and closed again,
which creates nothing.
"""

from __future__ import annotations

import errno
import os


def kvm_status(path: str = "/dev/kvm") -> str | None:
    """None when ``path`` opens read-write, else why not: missing, denied, or the errno."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
            return f"missing ({exc.strerror})"
        if exc.errno in (errno.EACCES, errno.EPERM):
            return f"denied ({exc.strerror}: the user needs access to {path}, e.g. group kvm)"
        return f"unusable ({exc.strerror})"
    os.close(fd)
    return None
