"""The runner inside the VM guest: run the matrix probes, print framed results on the console.

Started by the initramfs's init in a chroot of the host's root, with the
host's python3. It imports the probes of ``backends.kvm`` (one
implementation for both referees) and prints one line per cell::

    KVMPOISON-INFO {json}           the guest kernel and what it offers
    KVMPOISON-CELL {json}           path, backing, cell, detail
    KVMPOISON-SCENARIO {json}       i, and the live steps' results or an error
    KVMPOISON-END {json}            the probe time

A job holds ``cells`` (the oracle's matrix probes) and/or ``scenarios``
(``run --live --kernel``: each one's VMs and live steps, run by
``backends.kvm.live.run_live`` without /dev/kvm, as on the host with it).

It refuses to run anywhere but in the guest: the hwpoison backings poison a
page, which must never happen on the host.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import sys
import tempfile
import time
from types import FrameType

from kvmpoison.backends.kvm.probes import in_vm_guest, run_probe
from kvmpoison.matrix.protocol import REMOTE_PATHS, UNPOISON_PFN, thp_mode

PROBE_TIMEOUT = 30  # seconds per cell; TCG is slow, a hang is not
SCENARIO_TIMEOUT = 150  # seconds per scenario (the live child has its own 120 s alarm)
MARK_INFO, MARK_CELL, MARK_END = "KVMPOISON-INFO", "KVMPOISON-CELL", "KVMPOISON-END"
MARK_SCENARIO = "KVMPOISON-SCENARIO"
SHMEM_ENABLED = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"


def emit(mark: str, payload: dict[str, object]) -> None:
    sys.stdout.write(f"{mark} {json.dumps(payload, sort_keys=True)}\n")
    sys.stdout.flush()


class _ProbeTimeoutError(Exception):
    pass


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise _ProbeTimeoutError


def main(argv: list[str]) -> int:
    if not in_vm_guest():
        print("kvmpoison: the VM runner runs only inside the kvmpoison VM guest", file=sys.stderr)
        return 2
    with open(argv[1]) as fh:
        job = json.load(fh)
    emit(MARK_INFO, {"release": platform.release(),
                     "hwpoison_inject": os.path.exists(UNPOISON_PFN),
                     "shmem_enabled": shmem_thp_advise() if any(
                         b == "shmem_thp" for _, b in job.get("cells", [])) else "untouched",
                     "tmp_fs": _fs_type(tempfile.gettempdir()),
                     "thp_modes": thp_modes()})
    signal.signal(signal.SIGALRM, _alarm)
    t0 = time.perf_counter()
    for path, backing in job.get("cells", []):
        signal.alarm(PROBE_TIMEOUT)
        try:
            res = run_probe(path, backing, REMOTE_PATHS)
            cell, detail = res.cell, res.detail
        except _ProbeTimeoutError:
            cell, detail = "error", f"no result in {PROBE_TIMEOUT} s"
        except Exception as exc:  # report the cell, keep the run going
            cell, detail = "error", f"{type(exc).__name__}: {exc}"
        finally:
            signal.alarm(0)
        emit(MARK_CELL, {"path": path, "backing": backing, "cell": cell, "detail": detail})
    for i, sc in enumerate(job.get("scenarios", [])):
        emit(MARK_SCENARIO, {"i": i, **_scenario(sc["vms"], sc["steps"])})
    emit(MARK_END, {"seconds": round(time.perf_counter() - t0, 3)})
    return 0


def thp_modes() -> dict[str, str]:
    """The guest's THP sysfs files as it shows them (read after shmem_thp_advise), so the
    model runs with the same modes."""
    root = os.path.dirname(SHMEM_ENABLED)
    out = {}
    for name in ("enabled", "defrag", "shmem_enabled", "use_zero_page"):
        try:
            with open(os.path.join(root, name)) as fh:
                out[name] = fh.read().strip()
        except OSError:
            continue
    return out


def shmem_thp_advise() -> str:
    """Set the GUEST's shmem_enabled to ``advise``, so MADV_HUGEPAGE gives the shmem_thp
    column a huge page; return the mode it then shows, or why it could not be set.

    This is the VM guest's own sysfs (its kernel, its memory): main() has checked
    ``in_vm_guest()``. The host's THP settings are never written.
    """
    if not in_vm_guest():
        raise PermissionError("shmem_enabled is written only inside the kvmpoison VM guest")
    try:
        with open(SHMEM_ENABLED, "w") as fh:
            fh.write("advise")
        with open(SHMEM_ENABLED) as fh:
            return thp_mode(fh.read())
    except (OSError, ValueError) as exc:
        return f"unset ({type(exc).__name__}: {exc})"


def _scenario(vms: list[dict[str, object]], steps: list[dict[str, object]]) -> dict[str, object]:
    from kvmpoison.backends.kvm.live import LiveError, run_live

    signal.alarm(SCENARIO_TIMEOUT)
    try:
        return {"results": {str(k): v for k, v in run_live(vms, steps, use_kvm=False).items()}}
    except _ProbeTimeoutError:
        return {"error": f"no result in {SCENARIO_TIMEOUT} s"}
    except (LiveError, OSError, ValueError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        signal.alarm(0)


def _fs_type(mount_point: str) -> str:
    with open("/proc/mounts") as fh:
        types = [line.split()[2] for line in fh if line.split()[1] == mount_point]
    return types[-1] if types else "?"


if __name__ == "__main__":
    sys.exit(main(sys.argv))
