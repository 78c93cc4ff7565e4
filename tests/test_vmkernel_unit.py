"""The VM kernel backend's host-side parts, without booting anything."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from kvmpoison.backends.kvm.probes import in_vm_guest, run_probe
from kvmpoison.backends.vmkernel import kmod, qemu
from kvmpoison.backends.vmkernel.cache import KernelFiles
from kvmpoison.backends.vmkernel.errors import VmKernelUnavailableError
from kvmpoison.backends.vmkernel.initramfs import init_script, is_static_elf
from kvmpoison.backends.vmkernel.session import parse
from kvmpoison.kconfig import KernelVersion
from kvmpoison.matrix.protocol import HWPOISON_BACKINGS, PATHS, REMOTE_PATHS
from kvmpoison.report.vm_oracle import kconfig_from_text, vm_cells


def _ko(tmp: Path, name: str, deps: str) -> None:
    (tmp / f"{name}.ko").write_bytes(b"\x00junk\x00license=GPL\x00depends=" + deps.encode()
                                     + b"\x00name=" + name.encode() + b"\x00")


def test_modules_load_after_their_dependencies(tmp_path: Path) -> None:
    _ko(tmp_path, "9p", "9pnet,netfs,fscache")
    _ko(tmp_path, "9pnet", "")
    _ko(tmp_path, "fscache", "netfs")
    _ko(tmp_path, "netfs", "")
    _ko(tmp_path, "hwpoison-inject", "")
    order = kmod.load_order(kmod.index(tmp_path), ("9p", "hwpoison-inject", "brd"))
    assert order.index("netfs") < order.index("fscache") < order.index("9p")
    assert order.index("9pnet") < order.index("9p")
    assert "hwpoison_inject" in order and "brd" not in order  # brd is optional, absent here


def test_a_missing_required_module_is_an_error(tmp_path: Path) -> None:
    _ko(tmp_path, "9p", "9pnet")
    with pytest.raises(ValueError, match="9pnet"):
        kmod.load_order(kmod.index(tmp_path), ("9p",))


def _elf(with_interp: bool) -> bytes:
    head = bytearray(4096)
    head[:5] = b"\x7fELF\x02"
    struct.pack_into("<Q", head, 0x20, 64)
    struct.pack_into("<HH", head, 0x36, 56, 2)
    struct.pack_into("<I", head, 64, 1)  # PT_LOAD
    struct.pack_into("<I", head, 64 + 56, 3 if with_interp else 1)
    return bytes(head)


def test_only_an_elf_without_an_interpreter_counts_as_static() -> None:
    assert is_static_elf(_elf(False))
    assert not is_static_elf(_elf(True))
    assert not is_static_elf(b"#!/bin/sh\n")


def test_the_init_mounts_the_host_root_read_only_and_powers_off() -> None:
    script = init_script()
    assert "-o trans=virtio,version=9p2000.L,ro" in script
    assert script.rstrip().endswith("poweroff -f")


def test_console_lines_become_cells_and_noise_is_ignored(tmp_path: Path) -> None:
    console = "\n".join([
        "[    1.0] some kernel line",
        "KVMPOISON-STAGE chroot 4.25",
        'KVMPOISON-INFO {"release": "6.1.0-57-amd64"}',
        'KVMPOISON-CELL {"path": "load", "backing": "hwpoison_anon", '
        '"cell": "sig:SIGBUS:BUS_MCEERR_AR", "detail": ""}\r',
        'KVMPOISON-CELL {"path": "load", "backing": "anon", "ce',  # cut by a kernel message
        'KVMPOISON-END {"seconds": 1.5}',
    ])
    run = parse(KernelFiles(tmp_path), qemu.Boot(console, 9.0, "tcg"))
    assert run.cells == {("load", "hwpoison_anon"): "sig:SIGBUS:BUS_MCEERR_AR"}
    assert (run.boot_seconds, run.probe_seconds) == (4.25, 1.5)
    assert run.info["release"] == "6.1.0-57-amd64"


def test_a_guest_that_never_finishes_is_reported() -> None:
    with pytest.raises(VmKernelUnavailableError, match="did not finish"):
        parse(KernelFiles(Path("/nonexistent")), qemu.Boot("KVMPOISON-STAGE init 1\n", 1, "tcg"))


def test_tcg_unless_hardware_kvm_and_unknown_accelerators_refused() -> None:
    assert qemu.pick_accel("tcg") == "tcg"
    assert qemu.pick_accel("auto") == ("kvm" if qemu.hardware_kvm() else "tcg")
    with pytest.raises(ValueError, match="unknown accelerator"):
        qemu.pick_accel("hvf")


@pytest.mark.parametrize("backing", HWPOISON_BACKINGS)
def test_the_host_never_poisons_a_page(backing: str) -> None:
    assert not in_vm_guest()
    res = run_probe("load", backing, REMOTE_PATHS)
    assert res.cell == "error"
    assert "only inside the kvmpoison VM guest" in res.detail


def test_the_model_is_configured_from_the_kernel_config() -> None:
    text = ("CONFIG_MEMORY_FAILURE=y\nCONFIG_HWPOISON_INJECT=m\nCONFIG_MIGRATION=y\n"
            "# CONFIG_DEVICE_PRIVATE is not set\nCONFIG_X86_5LEVEL=y\n")
    kcfg = kconfig_from_text(text, KernelVersion.V6_1)
    assert kcfg.memory_failure and kcfg.migration and kcfg.x86_5level
    assert not kcfg.device_private and not kcfg.mem_soft_dirty
    assert not kconfig_from_text("# CONFIG_MEMORY_FAILURE is not set\n",
                                 KernelVersion.V6_1).memory_failure


def test_the_vm_referee_covers_all_paths_and_the_hwpoison_probes() -> None:
    cells = vm_cells()
    assert len(cells) == len(set(cells))
    for backing in HWPOISON_BACKINGS:
        assert {p for p, b in cells if b == backing} >= set(PATHS) | {"fork_child_load",
                                                                       "unpoison"}
    assert ("punch_hole_load", "hwpoison_shmem") in cells
    assert ("punch_hole_load", "hwpoison_anon") not in cells


def test_the_initramfs_is_rebuilt_when_its_inputs_change(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from kvmpoison.backends.vmkernel import initramfs

    kernel = KernelFiles(tmp_path)
    kernel.modules.mkdir()
    (kernel.modules / "9p.ko").write_bytes(b"x")
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"one")
    builds: list[int] = []

    def fake_build(k: KernelFiles) -> Path:
        builds.append(1)
        k.initramfs.write_bytes(b"cpio")
        return k.initramfs

    monkeypatch.setattr(initramfs, "find_busybox", lambda: busybox)
    monkeypatch.setattr(initramfs, "build", fake_build)
    initramfs.ensure(kernel)
    initramfs.ensure(kernel)
    assert len(builds) == 1  # cached
    busybox.write_bytes(b"two")
    initramfs.ensure(kernel)
    assert len(builds) == 2
