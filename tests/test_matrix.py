"""The model's access matrix against the real kernel's (real_kernel_oracle.md §A2)."""

import pytest

from kvmpoison.kconfig import THIS_MACHINE, KernelConfig, KernelVersion
from kvmpoison.matrix import real_6_18
from kvmpoison.matrix.model import run_matrix
from kvmpoison.matrix.protocol import BACKINGS, PATHS
from kvmpoison.outcome import is_cell


@pytest.fixture(scope="module")
def this_machine() -> dict[tuple[str, str], str]:
    return {(c.path, c.backing): c.cell for c in run_matrix(THIS_MACHINE)}


def test_protocol_has_32_paths_and_8_backings() -> None:
    assert len(PATHS) == 32 and len(set(PATHS)) == 32
    assert BACKINGS == real_6_18.BACKINGS
    assert set(real_6_18.TABLE) == set(PATHS)


@pytest.mark.parametrize("path", PATHS)
def test_every_cell_equals_the_real_kernel(
    this_machine: dict[tuple[str, str], str], path: str
) -> None:
    model = tuple(this_machine[(path, b)] for b in BACKINGS)
    assert model == real_6_18.TABLE[path]
    assert all(is_cell(c) for c in model)


def test_memory_failure_turns_poison_touches_into_mceerr() -> None:
    mf = KernelConfig(version=KernelVersion.V6_18, memory_failure=True)
    grid = {(c.path, c.backing): c.cell for c in run_matrix(mf)}
    for path in PATHS:
        for backing in BACKINGS:
            expected = real_6_18.cell(path, backing)
            if backing == "uffd_poison" and path in ("load", "store"):
                expected = "sig:SIGBUS:BUS_MCEERR_AR"
            assert grid[(path, backing)] == expected, (path, backing)
