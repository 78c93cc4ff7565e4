"""The real-kernel backend: ioctl numbers, struct layouts, errors, real guests, the oracle."""

import ctypes
import errno
import json
import os

import pytest

from kvmpoison.backends.kvm import Kvm, KvmError, uapi
from kvmpoison.backends.kvm.guests import run_program
from kvmpoison.backends.kvm.ioctl import _IOC
from kvmpoison.backends.kvm.system import EHWPOISON, Hlt, Io, MemoryFault, Mmio, decode_exit
from kvmpoison.cli.main import main
from kvmpoison.kconfig import host_kernel_config
from kvmpoison.matrix import protocol
from kvmpoison.matrix.model import model_thp_check


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (uapi.KVM_GET_API_VERSION, 0xAE00),
        (uapi.KVM_CREATE_VM, 0xAE01),
        (uapi.KVM_CHECK_EXTENSION, 0xAE03),
        (uapi.KVM_CREATE_VCPU, 0xAE41),
        (uapi.KVM_SET_USER_MEMORY_REGION, 0x4020AE46),
        (uapi.KVM_SET_USER_MEMORY_REGION2, 0x40A0AE49),
        (uapi.KVM_CREATE_GUEST_MEMFD, 0xC040AED4),
        (uapi.KVM_RUN, 0xAE80),
        (uapi.KVM_GET_REGS, 0x8090AE81),
        (uapi.KVM_SET_REGS, 0x4090AE82),
        (uapi.KVM_GET_SREGS, 0x8138AE83),
        (uapi.KVM_SET_SREGS, 0x4138AE84),
    ],
)
def test_ioctl_numbers_are_locked(value: int, expected: int) -> None:
    assert value == expected


def test_struct_layouts_match_the_uapi() -> None:
    sizes = {uapi.kvm_userspace_memory_region: 32, uapi.kvm_userspace_memory_region2: 160,
             uapi.kvm_create_guest_memfd: 64, uapi.kvm_regs: 144, uapi.kvm_segment: 24,
             uapi.kvm_dtable: 16, uapi.kvm_sregs: 312}
    for struct, size in sizes.items():
        assert ctypes.sizeof(struct) == size, struct.__name__
    assert uapi.kvm_run.u.offset == 32
    with pytest.raises(ValueError, match="does not fit"):
        _IOC(1, 0xAE, 1, 1 << 14)


def test_bad_fd_is_ebadf_with_the_ioctl_name() -> None:
    fd = os.open("/dev/null", os.O_RDONLY)
    os.close(fd)  # now a closed fd number
    with pytest.raises(KvmError) as info:
        Kvm.from_fd(fd).check_extension(uapi.Cap.GUEST_MEMFD)
    assert info.value.errno == errno.EBADF and info.value.ioctl == "KVM_CHECK_EXTENSION"
    assert isinstance(info.value, OSError)


def test_missing_device_is_a_kvm_error() -> None:
    with pytest.raises(KvmError) as info:
        Kvm("/nonexistent/kvm")
    assert info.value.errno == errno.ENOENT


def test_memory_fault_exit_is_decoded_not_raised() -> None:
    run = uapi.kvm_run()
    run.exit_reason = uapi.ExitReason.MEMORY_FAULT
    run.u.memory_fault.flags = uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE
    run.u.memory_fault.gpa = 0xC0000000
    run.u.memory_fault.size = 4096
    for err in (errno.EFAULT, EHWPOISON):
        got = decode_exit(run, -1, err)
        assert got == MemoryFault(uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE, 0xC0000000, 4096, err)
    run.exit_reason = uapi.ExitReason.HLT
    with pytest.raises(KvmError, match="KVM_RUN"):
        decode_exit(run, -1, errno.EFAULT)  # no exit 39: a real error
    assert decode_exit(run, 0, 0) == Hlt()


@pytest.mark.kvm
def test_capabilities_include_guest_memfd() -> None:
    with Kvm() as kvm:
        assert kvm.get_api_version() == uapi.KVM_API_VERSION
        caps = kvm.caps()
        assert caps["GUEST_MEMFD"] == 1 and caps["USER_MEMORY2"] == 1
        assert caps["GUEST_MEMFD_FLAGS"] & uapi.GUEST_MEMFD_FLAG_MMAP


@pytest.mark.kvm
def test_bad_guest_memfd_arguments_are_einval() -> None:
    with Kvm() as kvm, kvm.create_vm() as vm:
        for size, flags in ((100, 0), (4096, 1 << 7)):
            with pytest.raises(KvmError) as info:
                vm.create_guest_memfd(size, flags)
            assert info.value.errno == errno.EINVAL
            assert info.value.ioctl == "KVM_CREATE_GUEST_MEMFD"


@pytest.mark.kvm
@pytest.mark.parametrize("mode", ["real", "long"])
@pytest.mark.parametrize("data", ["anon", "gmem-shared"])
def test_a_real_guest_reads_host_data_and_the_host_sees_its_writes(mode: str, data: str) -> None:
    with Kvm() as kvm:
        run = run_program(kvm, mode, data, fill=0xAA)
    assert run.exits == [Io(0x10, uapi.KVM_EXIT_IO_OUT, b"\xaa"),
                         Io(0x11, uapi.KVM_EXIT_IO_OUT, b"\x55"), Hlt()]
    assert run.data_after == b"\xaa\x55"


@pytest.mark.kvm
def test_private_gmem_shows_up_as_an_mmio_exit_on_this_host() -> None:
    # KVM here emulates every instruction through userspace_addr: the private
    # gmem mapping cannot be read, and the emulator falls back to MMIO.
    with Kvm() as kvm:
        run = run_program(kvm, "real", "gmem-private")
    assert len(run.exits) == 1 and isinstance(run.exits[0], Mmio)
    assert run.exits[0].gpa == 0x10000 and not run.exits[0].is_write


@pytest.mark.kvm
def test_oracle_agrees_with_the_model_on_every_cell(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["oracle", "--format", "json", "--scenarios"])
    doc = json.loads(capsys.readouterr().out)
    assert doc["seconds"] < 60
    every = doc["every_cell"]
    base = [c for c in every if c["backing"] in protocol.BACKINGS]
    assert len(base) == 256 and all(c["live"] == c["model"] for c in base)
    assert {(c["path"], c["backing"]) for c in base} == {
        (p, b) for p in protocol.PATHS for b in protocol.BACKINGS}
    # The THP columns: refereed where the kernel PMD-maps the region, else named with the
    # reason (this host: shmem_enabled=never). anon_thp must be refereed.
    skipped = {r["backing"] for r in doc["not_refereed"]}
    refereed = [b for b in protocol.THP_BACKINGS if b not in skipped]
    assert "anon_thp" in refereed and set(doc["backings"]) >= set(refereed)
    thp = {(c["path"], c["backing"]) for c in every if c["backing"] in protocol.THP_BACKINGS}
    assert thp == {(p, b) for p in protocol.PATHS + protocol.THP_PATHS for b in refereed}
    assert doc["cells"] == len(every) == 256 + len(thp)
    assert all(r["reason"] for r in doc["not_refereed"])
    # Until the model's mm maps THPs, exactly the THP probes may disagree, and a note says why.
    wrong = {(d["path"], d["backing"]) for d in doc["disagreements"]}
    if model_thp_check(host_kernel_config().config, "anon_thp"):
        assert ("thp_smaps", "anon_thp") in wrong
        assert wrong <= {(p, b) for p in protocol.THP_PATHS for b in refereed}
        assert any(n.startswith("model: anon_thp") for n in doc["notes"]) and rc == 1
    else:
        assert wrong == set() and rc == 0
    scen = doc["scenarios"]  # --scenarios: the shipped library refereed step by step
    assert scen["disagreements"] == [] and scen["refereed"] >= 100 and scen["not_refereed"] > 0


def test_backend_imports_nothing_from_the_model() -> None:
    import ast
    import pathlib

    import kvmpoison.backends.kvm as backend

    root = pathlib.Path(backend.__file__).parent
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text())
        names = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        names += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        for name in names:
            assert not name.startswith(("kvmpoison.mm", "kvmpoison.virt", "kvmpoison.kernel")), \
                (path.name, name)
