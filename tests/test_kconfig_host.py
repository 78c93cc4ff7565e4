"""The running kernel's CONFIG switches are read from its config file, never probed."""

from __future__ import annotations

import gzip
from pathlib import Path

from kvmpoison.kconfig import KernelVersion, host_kernel_config, parse_kconfig

CONFIG = """\
#
# Automatically generated file; DO NOT EDIT.
CONFIG_MIGRATION=y
# CONFIG_MEMORY_FAILURE is not set
CONFIG_DEVICE_PRIVATE=y
# CONFIG_MEM_SOFT_DIRTY is not set
CONFIG_PGTABLE_LEVELS=5
CONFIG_LOCALVERSION="-fc"
"""


def _cpuinfo(tmp_path: Path, flags: str) -> str:
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nflags\t\t: fpu vme {flags}\n")
    return str(path)


def test_parse_kconfig_reads_set_unset_and_strings() -> None:
    values = parse_kconfig(CONFIG)
    assert values["CONFIG_MIGRATION"] == "y"
    assert values["CONFIG_MEMORY_FAILURE"] == "n"
    assert values["CONFIG_LOCALVERSION"] == "-fc"
    assert "CONFIG_KSM" not in values


def test_gzipped_config_sets_every_switch(tmp_path: Path) -> None:
    path = tmp_path / "config.gz"
    path.write_bytes(gzip.compress(CONFIG.encode()))
    host = host_kernel_config("6.18.44-fc", [str(path)], _cpuinfo(tmp_path, "sse la57"))
    cfg = host.config
    assert cfg.version is KernelVersion.V6_18
    assert (cfg.memory_failure, cfg.migration, cfg.device_private, cfg.mem_soft_dirty) == (
        False, True, True, False)
    assert cfg.x86_5level  # 5-level built and the CPU has LA57
    assert host.source == str(path) and host.assumed == ()
    assert "CONFIG_MEMORY_FAILURE=n" in host.describe()


def test_five_level_needs_the_cpu_flag(tmp_path: Path) -> None:
    path = tmp_path / "config-5.12.0"
    path.write_text(CONFIG)
    host = host_kernel_config("5.12.0", [str(path)], _cpuinfo(tmp_path, "sse"))
    assert host.config.version is KernelVersion.V5_12
    assert not host.config.x86_5level


def test_first_readable_config_wins(tmp_path: Path) -> None:
    second = tmp_path / "config"
    second.write_text("CONFIG_MEMORY_FAILURE=y\n")
    host = host_kernel_config("6.18.1", [str(tmp_path / "absent.gz"), str(second)],
                              _cpuinfo(tmp_path, ""))
    assert host.config.memory_failure and not host.config.migration
    assert host.source == str(second)


def test_without_a_config_the_defaults_are_named_as_assumed(tmp_path: Path) -> None:
    host = host_kernel_config("6.18.1", [str(tmp_path / "none")], _cpuinfo(tmp_path, ""),
                              sysctl=str(tmp_path / "nosys" / "vm" / "x"))
    assert host.source is None
    assert "CONFIG_MEMORY_FAILURE=y" in host.assumed
    assert "assumed" in host.describe()


def test_an_unknown_release_names_the_version_assumed(tmp_path: Path) -> None:
    host = host_kernel_config("9.99.0", [], _cpuinfo(tmp_path, ""), sysctl=str(tmp_path / "x"))
    assert any(item.startswith("version ") for item in host.assumed)
