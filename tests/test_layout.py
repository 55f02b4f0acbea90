"""The installed shape: one top-level package, and no clash with a user's own `tasks/`."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "--outdir",
            str(dist),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (found,) = dist.glob("imagebatch-*.whl")
    return found


def test_wheel_has_exactly_one_top_level_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert tops == {"imagebatch"}
    for stage in ("flows/run_jobs.py", "tasks/dispatch.py", "configs/models.toml", "py.typed"):
        assert any(n == f"imagebatch/{stage}" for n in names), stage


def test_cli_works_beside_a_users_own_tasks_package(tmp_path: Path) -> None:
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "__init__.py").write_text("")
    (tmp_path / "tasks" / "errors.py").write_text("raise ImportError('the user tasks package')\n")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "__init__.py").write_text("raise ImportError('the user configs')\n")
    done = subprocess.run(
        [sys.executable, "-m", "imagebatch.cli", "models"],
        cwd=tmp_path,
        env={**os.environ, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "gpt-image-2" in done.stdout
