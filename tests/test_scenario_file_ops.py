"""Scenario ops for files and memslots on the model: each op's cells, saved refs, bad input."""

from __future__ import annotations

import pytest

from kvmpoison.cli.main import main
from kvmpoison.scenario.loader import ScenarioError, load_text
from kvmpoison.scenario.ops import OpError, call_args, parse_ref
from kvmpoison.scenario.runner import ScenarioRun, run_scenario

HEAD = '[scenario]\ndesigns = "baseline"\n[machine]\nkernel = "6.18"\nintegrity = "off"\n'
GMEM = ('[[step]]\nactor = "vmm:vm0"\nop = "guest_memfd_create"\nsize = 0x10000\n'
        'flags = ["MMAP", "INIT_SHARED"]\nsave = "g"\n')
MAP = '[[step]]\nactor = "vmm:vm0"\nop = "mmap"\nfd = "$g"\nsize = 0x10000\nsave = "m"\n'


def step(op: str, **fields: object) -> str:
    body = "".join(f"{k} = {v!r}\n".replace("'", '"') if isinstance(v, (str, list))
                   else f"{k} = {str(v).lower() if isinstance(v, bool) else v}\n"
                   for k, v in fields.items())
    return f'[[step]]\nactor = "vmm:vm0"\nop = "{op}"\n{body}'


def run(*steps: str, design: str = "baseline") -> ScenarioRun:
    return run_scenario(load_text(HEAD + "".join(steps), "t.toml"), design)


def cells(r: ScenarioRun) -> list[str]:
    return [x.outcome.cell for x in r.results]


def test_guest_memfd_create_saves_an_fd_that_later_steps_use() -> None:
    r = run(GMEM, MAP, step("store", hva="$m+0x3000", data="abc"),
            step("load", hva="$m+0x3000", size=3))
    assert cells(r) == ["ok", "ok", "ok", "ok"]
    assert r.results[3].outcome.data == b"abc"


@pytest.mark.parametrize(("flags", "cell"), [([], "ok"), (["MMAP"], "ok"), (3, "ok"),
                                              (4, "err:EINVAL")])
def test_guest_memfd_create_flags(flags: object, cell: str) -> None:
    assert cells(run(step("guest_memfd_create", size=0x4000, flags=flags))) == [cell]


def test_mmap_needs_the_mmap_flag_and_map_shared() -> None:
    r = run(step("guest_memfd_create", size=0x4000, save="p"), step("mmap", fd="$p", size=0x4000),
            GMEM, step("mmap", fd="$g", size=0x4000, shared=False))
    assert cells(r) == ["ok", "err:ENODEV", "ok", "err:EINVAL"]


def test_file_calls_on_a_guest_memfd() -> None:
    r = run(GMEM, step("read", fd="$g", size=8), step("write", fd="$g", size=8),
            step("pread", fd="$g", size=8, offset=0), step("pwrite", fd="$g", size=8, offset=0),
            step("lseek", fd="$g", offset=0, whence="CUR"),
            step("ftruncate", fd="$g", size=0x1000),
            step("fallocate", fd="$g", mode=[], offset=0, len=0x1000),
            step("fallocate", fd="$g", mode=["KEEP_SIZE"], offset=0, len=0x1000))
    assert cells(r)[1:] == ["err:EINVAL", "err:EINVAL", "err:ESPIPE", "err:ESPIPE",
                            "err:ESPIPE", "err:EINVAL", "err:EOPNOTSUPP", "ret:0"]


def test_punch_hole_then_the_mapping_reads_zeros() -> None:
    r = run(GMEM, MAP, step("store", hva="$m", data="data"),
            step("fallocate", fd="$g", mode=["PUNCH_HOLE", "KEEP_SIZE"], offset=0, len=0x1000),
            step("load", hva="$m", size=4))
    assert cells(r)[3:] == ["ret:0", "ok"]
    assert r.results[4].outcome.data == bytes(4)


def test_lseek_on_a_regular_file() -> None:
    from kvmpoison.machine import Machine, VmSpec
    from kvmpoison.mm.file import O_RDWR

    m = Machine(vms=[VmSpec("vm0")])
    proc = m.vmm.proc
    m.kernel.create_file("/f", b"x" * 100)
    fd = proc.open("/f", O_RDWR).value
    assert fd is not None
    assert proc.lseek(fd, 10, 0).cell == "ret:10"
    assert proc.lseek(fd, 5, 1).cell == "ret:15"
    assert proc.lseek(fd, -1, 2).cell == "ret:99"
    assert proc.lseek(fd, -200, 2).cell == "err:EINVAL"
    assert proc.lseek(fd, 0, 7).cell == "err:EINVAL"
    assert proc.lseek(999, 0, 0).cell == "err:EBADF"


def test_pwrite_then_pread_moves_the_data_on_a_file_that_allows_it() -> None:
    from kvmpoison.machine import Machine, VmSpec
    from kvmpoison.scenario.ops import RunCtx, _file_op

    m = Machine(vms=[VmSpec("vm0")])
    ctx = RunCtx(m)
    inst = m.instances["vm0"]
    ram_fd = inst.vmm.ram_fd
    assert ram_fd is not None
    wrote = _file_op(ctx, inst, "pwrite", {"fd": ram_fd, "size": 6, "offset": 0x5000,
                                           "data": "hello!"})
    got = _file_op(ctx, inst, "pread", {"fd": ram_fd, "size": 6, "offset": 0x5000})
    assert wrote.cell == "ret:6" and got.cell == "ret:6" and got.data == b"hello!"
    assert _file_op(ctx, inst, "lseek", {"fd": ram_fd, "offset": 0, "whence": "END"}).cell == \
        f"ret:{inst.vmm.ram_size}"


def test_set_user_memory_region2_binding_rules() -> None:
    slot = {"gpa": 0x10000000, "size": 0x4000, "guest_memfd": "$g", "flags": ["GUEST_MEMFD"]}
    r = run(GMEM,
            step("set_user_memory_region2", slot=1, **slot),
            step("set_user_memory_region2", slot=1, **slot),
            step("set_user_memory_region2", slot=2, **{**slot, "gpa": 0x20000000}),
            step("set_user_memory_region2", slot=2, **{**slot, "gpa": 0x20000000,
                                                       "guest_memfd_offset": 0x1000}),
            step("set_user_memory_region2", slot=2, **{**slot, "gpa": 0x20000000,
                                                       "guest_memfd_offset": 0xe000}),
            step("set_user_memory_region2", slot=2, **{**slot, "gpa": 0x20000000,
                                                       "guest_memfd": 77}),
            step("set_user_memory_region2", slot=2, **{**slot, "gpa": 0x10002000,
                                                       "guest_memfd_offset": 0x8000}),
            step("set_user_memory_region2", slot=2, **{**slot, "gpa": 0x20000000,
                                                       "flags": 5, "guest_memfd_offset": 0x8000}),
            step("set_user_memory_region2", slot=1, gpa=0, size=0),
            step("set_user_memory_region2", slot=2, **{**slot, "gpa": 0x20000000}))
    assert cells(r)[1:] == ["ret:0", "err:EINVAL", "err:EINVAL", "err:EINVAL", "err:EINVAL",
                            "err:EBADF", "err:EEXIST", "err:EINVAL", "ret:0", "ret:0"]


def test_a_failed_bind_leaves_no_slot_behind() -> None:
    """The bind runs on the new slot; its failure must undo the slot (no EEXIST later)."""
    r = run(step("set_user_memory_region2", slot=1, gpa=0x10000000, size=0x1000,
                 guest_memfd=55, flags=["GUEST_MEMFD"]),
            step("set_user_memory_region2", slot=2, gpa=0x10000000, size=0x1000,
                 hva=0x7000000000))
    assert cells(r) == ["err:EBADF", "ret:0"]


def test_fstat_gives_size_and_block_size_and_close_ends_the_fd() -> None:
    r = run(GMEM, step("fstat", fd="$g"), step("close", fd="$g"), step("fstat", fd="$g"),
            step("close", fd="$g"), step("mmap", fd="$g", size=0x1000))
    assert cells(r) == ["ok", "ret:0", "ret:0", "err:EBADF", "err:EBADF", "err:EBADF"]
    assert r.results[1].outcome.data == b"st_size=65536 st_blksize=4096"


def test_a_plain_memfd_does_not_bind() -> None:
    r = run(step("memfd_create", save="f"), step("ftruncate", fd="$f", size=0x4000),
            step("fstat", fd="$f"),
            step("set_user_memory_region2", slot=1, gpa=0x10000000, size=0x4000,
                 guest_memfd="$f", flags=["GUEST_MEMFD"]))
    assert cells(r) == ["ok", "ret:0", "ret:0", "err:EINVAL"]
    assert r.results[2].outcome.data == b"st_size=16384 st_blksize=4096"


def test_a_guest_memfd_of_another_vm_does_not_bind() -> None:
    """guest_memfd_create's ``vm``: the ioctl goes to that VM; kvm_gmem_bind refuses its file."""
    two = '[[vm]]\nname = "vm0"\n[[vm]]\nname = "vm1"\n'
    slot = {"gpa": 0x10000000, "size": 0x4000, "flags": ["GUEST_MEMFD"]}
    r = run_scenario(load_text(HEAD + two + "".join((
        step("guest_memfd_create", size=0x4000, vm="vm1", save="other"),
        step("guest_memfd_create", size=0x4000, save="own"),
        step("set_user_memory_region2", slot=1, guest_memfd="$other", **slot),
        step("set_user_memory_region2", slot=1, guest_memfd="$own", **slot),
        step("set_user_memory_region2", slot=1, guest_memfd="$other", vm="vm1", **slot))),
        "t.toml"), "baseline")
    assert cells(r) == ["ok", "ok", "err:EINVAL", "ret:0", "ret:0"]


def test_the_v1_ioctl_refuses_v2_only_and_unknown_flags() -> None:
    """kvm_vm_ioctl: KVM_SET_USER_MEMORY_REGION takes LOG_DIRTY_PAGES and READONLY only."""
    region = '[[step]]\nactor = "host"\nop = "set_memory_region"\nvm = "vm0"\nslot = 1\n' \
             'guest_phys_addr = 0x10000000\nsize = 0x1000\nalias_gpa = 0x30000\n'
    r = run(region + "flags = 4\n", region + "flags = 0x80000000\n", region + "flags = 0\n")
    assert cells(r) == ["err:EINVAL", "err:EINVAL", "ret:0"]


def test_parse_ref() -> None:
    assert parse_ref("$m") == ("m", 0)
    assert parse_ref("$m+0x2000") == ("m", 0x2000)
    assert parse_ref("$buf_1-16") == ("buf_1", -16)
    for bad in ("m", "$", "$1x", "$m+zz"):
        with pytest.raises(OpError):
            parse_ref(bad)


def test_call_args_turns_names_into_numbers() -> None:
    assert call_args("fallocate", {"fd": "$g", "mode": ["PUNCH_HOLE", "KEEP_SIZE"], "offset": 0,
                                   "len": 4096}) == {"fd": "$g", "mode": 3, "offset": 0,
                                                     "len": 4096}
    assert call_args("lseek", {"fd": 3, "offset": 5, "whence": "END"})["whence"] == 2
    assert call_args("set_user_memory_region2", {"slot": 1, "gpa": 0, "size": 4096,
                                                 "flags": ["GUEST_MEMFD"]})["flags"] == 4


@pytest.mark.parametrize(("text", "words"), [
    (step("mmap", fd="$nothing", size=4096), "names no fd or address"),
    (step("load", hva="$m"), "names no fd or address"),
    (GMEM + step("guest_memfd_create", size=4096, flags=["PRIVATE"]), "unknown flag 'PRIVATE'"),
    (GMEM + step("fallocate", fd="$g", mode=["HOLE"], offset=0, len=1), "unknown flag 'HOLE'"),
    (GMEM + step("lseek", fd="$g", offset=0, whence="MIDDLE"), "whence"),
    (step("set_user_memory_region2", slot=1 << 32, gpa=0, size=0), "slot"),
    (step("set_user_memory_region2", slot=1, gpa=-1, size=0), "gpa"),
    (step("read", fd=1 << 40, size=8), "fd"),
    (GMEM + step("read", fd="$g", size=1 << 30), "size"),
    (GMEM + step("mmap", fd="$g", size=4096, shared="yes"), "shared"),
    (step("load", hva="$m+0xzz"), "offset"),
    (step("close", fd=3), "saved fd"),
    ('[[step]]\nactor = "host"\nop = "set_memory_region"\nvm = "vm0"\nslot = 1\n'
     'guest_phys_addr = 0x10000000\nsize = 0x1000\nalias_gpa = 0x30000\nflags = 2\n',
     "READONLY"),
    (step("guest_memfd_create", size=4096, vm="vm9"), "names no [[vm]]"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path: object, capsys: pytest.CaptureFixture[str],
                                          text: str, words: str) -> None:
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    path = tmp_path / "bad.toml"
    path.write_text(HEAD + text)
    rc = main(["run", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and words in err[0], err


def test_a_reference_must_be_saved_by_an_mmap_or_a_create() -> None:
    """A load's save keeps bytes for expect_data, not an address: "$x" may not name it."""
    text = HEAD + step("load", gpa=0, save="x") + step("load", hva="$x")
    with pytest.raises(ScenarioError, match="names no fd or address"):
        load_text(text, "t.toml")


def test_a_step_on_a_vmm_killed_by_sigsegv_is_one_line_and_exit_2(
        tmp_path: object, capsys: pytest.CaptureFixture[str]) -> None:
    """The VMM handles SIGBUS only: after a SIGSEGV it is dead, and a later step says so."""
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    path = tmp_path / "dead.toml"
    path.write_text(HEAD + step("munmap", gpa=0x30000) + step("load", gpa=0x30000)
                    + '[[step]]\nactor = "host"\nop = "process_vm_readv"\ntarget = "vm0"\n'
                      'gpa = 0x10000\n')
    rc = main(["run", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "killed by a signal" in err[0], err


def test_set_user_memory_region2_checks_in_the_live_kernels_order() -> None:
    """The op runs gmem_memslot's ioctl (tests/test_gmem_live.py referees it): the bind
    comes before the kvm_mmu_max_gfn() check, READONLY cannot be toggled, and dropping
    GUEST_MEMFD is no FLAGS_ONLY change."""
    plain = {"gpa": 0x20000000, "size": 0x1000, "hva": 0x7000000000}
    gmem = {"size": 0x1000, "guest_memfd": "$g", "flags": ["GUEST_MEMFD"]}
    r = run(GMEM,
            step("set_user_memory_region2", slot=5, **plain),
            step("set_user_memory_region2", slot=5, flags=2, **plain),
            step("set_user_memory_region2", slot=5, flags=1, **plain),
            step("set_user_memory_region2", slot=1, gpa=1 << 60, **{**gmem, "guest_memfd": 77}),
            step("set_user_memory_region2", slot=1, gpa=1 << 60, **gmem),
            step("set_user_memory_region2", slot=2, gpa=0x10000000, **gmem),
            step("set_user_memory_region2", slot=2, gpa=0x10000000, size=0x1000))
    assert cells(r)[1:] == ["ret:0", "err:EINVAL", "ret:0", "err:EBADF", "err:EINVAL",
                            "ret:0", "err:EINVAL"]


def test_a_slot_the_op_binds_serves_the_gmem_designs_faults() -> None:
    """On design gmem the guest's shared access to a slot of a GUEST_MEMFD_FLAG_MMAP file
    is served from the file (kvm_memslot_is_gmem_only), whatever userspace_addr says."""
    r = run(GMEM, MAP, step("store", hva="$m+0x1000", data="in the file"),
            step("set_user_memory_region2", slot=4, gpa=0x40000000, size=0x4000,
                 guest_memfd="$g", flags=["GUEST_MEMFD"]),
            '[[step]]\nactor = "guest:vm0"\nop = "share"\ngpa = 0x40001000\n',
            '[[step]]\nactor = "guest:vm0"\nop = "load"\ngpa = 0x40001000\nsize = 11\n',
            design="gmem")
    assert cells(r) == ["ok", "ok", "ok", "ret:0", "ret:0", "ok"]
    assert r.results[-1].outcome.data == b"in the file"


def test_the_v1_ioctl_cannot_change_a_guest_memfd_slot_only_delete_it() -> None:
    """KVM_SET_USER_MEMORY_REGION (flags 0) on a slot REGION2 bound: the same values or a
    move toggle GUEST_MEMFD (-EINVAL on 6.18.44); deleting it frees the file range."""
    region = {"gpa": 0x10000000, "size": 0x4000, "hva": "$m", "guest_memfd": "$g",
              "flags": ["GUEST_MEMFD"]}
    v1 = '[[step]]\nactor = "host"\nop = "set_memory_region"\nvm = "vm0"\nslot = 1\nhva = "$m"\n'
    r = run(GMEM, MAP, step("set_user_memory_region2", slot=1, **region),
            v1 + "guest_phys_addr = 0x10000000\nsize = 0x4000\n",
            v1 + "guest_phys_addr = 0x20000000\nsize = 0x4000\n",
            v1 + "guest_phys_addr = 0x10000000\nsize = 0\n",
            step("set_user_memory_region2", slot=2, **region))
    assert cells(r)[2:] == ["ret:0", "err:EINVAL", "err:EINVAL", "ret:0", "ret:0"]
