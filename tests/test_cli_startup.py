"""Start-up of the command line: a command loads only itself; the package alone loads no numpy."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from kvmpoison.cli.main import COMMANDS, app_for, make_app

SRC = str(Path(__file__).resolve().parents[1] / "src")

PROBE = """
import json, os, sys
import kvmpoison
bare = sorted(m for m in ("numpy", "kvmpoison.config", "typer") if m in sys.modules)
from kvmpoison.cli.main import app_for
app_for(["run"])
print(json.dumps({"bare": bare, "blas": os.environ.get("OPENBLAS_NUM_THREADS"),
                  "cli": sorted(m for m in sys.modules if m.startswith("kvmpoison.cli.")),
                  "rich": any(m.startswith("rich") for m in sys.modules),
                  "config": kvmpoison.Config.__module__}))
"""


def _probe() -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          env=env, check=True)
    out: dict[str, object] = json.loads(done.stdout)
    return out


def test_run_loads_only_its_command_and_no_rich() -> None:
    got = _probe()
    assert got["bare"] == []  # `import kvmpoison` alone: no numpy, no model, no typer
    assert got["config"] == "kvmpoison.config"  # the re-exports still resolve
    assert got["cli"] == ["kvmpoison.cli.errors", "kvmpoison.cli.main", "kvmpoison.cli.run"]
    assert got["rich"] is False  # rich loads only to draw a table or a bar
    assert got["blas"] == "1"


def test_users_blas_threads_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    import kvmpoison.cli.main as cli_main

    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "3")
    importlib.reload(cli_main)  # runs the module's start-up code again
    assert os.environ["OPENBLAS_NUM_THREADS"] == "3"


def _names(app: typer.Typer) -> set[str]:
    group = typer.main.get_command(app)
    assert isinstance(group, typer.core.TyperGroup)  # a group even with one command
    return set(group.commands)


def test_one_command_app_is_still_a_group_and_full_app_has_all() -> None:
    assert _names(app_for(["run", "--list"])) == {"run"}
    assert _names(app_for(["pte", "decode"])) == {"pte"}
    assert _names(app_for(["--help"])) == set(COMMANDS)
    assert _names(app_for(["nope"])) == set(COMMANDS)
    assert _names(app_for([])) == set(COMMANDS)
    assert _names(make_app()) == set(COMMANDS)


RUN_ALL_GMEM = """
import sys
from kvmpoison.scenario.library import shipped
from kvmpoison.scenario.loader import load
from kvmpoison.scenario.runner import run_scenario
for path in shipped().values():
    run_scenario(load(path), "gmem")
print("numpy.ma" in sys.modules)
"""


def test_running_the_library_never_loads_numpy_ma() -> None:
    # np.unique loads numpy.ma (10-30 ms) on first use; the model's paths avoid it.
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", RUN_ALL_GMEM], capture_output=True, text=True,
                          env=env, check=True)
    assert done.stdout.strip() == "False"
