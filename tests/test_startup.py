"""Start-up: commands that send nothing never import Prefect (about a second, plus its
server in ephemeral mode), nor pandas and pyarrow (a third of a second): `--help`, `models`
and `validate` of a CSV.

Each command runs in a fresh interpreter, as a user runs it; the probe then lists which of
the heavy packages that command imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

from imagebatch.cli import main

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("prefect", "pandas", "pyarrow")

PROBE = f"""
import json, sys
from imagebatch.cli import main
report, args = sys.argv[1], sys.argv[2:]
code = 0
try:
    main(args, prog_name="imagebatch")
except SystemExit as stop:
    code = stop.code if isinstance(stop.code, int) else 1
loaded = sorted({{m.split(".")[0] for m in sys.modules}} & {set(HEAVY)!r})
with open(report, "w") as f:
    json.dump({{"loaded": loaded, "code": code}}, f)
"""


def loaded_by(tmp_path: Path, *args: str, code: int = 0) -> list[str]:
    """The heavy packages `imagebatch ARGS` imports, run in a new interpreter; the command
    must end with exit status `code` (a command that crashed early proves nothing)."""
    report = tmp_path / "loaded.json"
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(report), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.exists(), proc.stderr
    result = json.loads(report.read_text())
    assert result["code"] == code, proc.stdout + proc.stderr
    return result["loaded"]


def every_command(group: click.Group = main, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [prefix]
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            found += every_command(command, (*prefix, name))
        else:
            found.append((*prefix, name))
    return found


@pytest.mark.parametrize("command", every_command(), ids=lambda c: " ".join(c) or "imagebatch")
def test_help_of_every_command_imports_no_prefect_pandas_or_pyarrow(tmp_path, command):
    assert loaded_by(tmp_path, *command, "--help") == []


def test_models_imports_no_prefect_pandas_or_pyarrow(tmp_path):
    assert loaded_by(tmp_path, "models") == []


def test_validate_of_a_csv_imports_no_prefect_pandas_or_pyarrow(tmp_path):
    assert loaded_by(tmp_path, "validate", "data/catalog.csv", code=1) == []  # one invalid row


def test_the_probe_sees_what_a_run_imports(tmp_path):
    """The probe can fail: a run imports Prefect (here it stops at once: no jobs file)."""
    assert "prefect" in loaded_by(
        tmp_path, "run", str(tmp_path / "missing.csv"), "--simulate", code=2
    )


RUN_PROBE = """
import json, sys
from pathlib import Path

report, out = sys.argv[1], Path(sys.argv[2])
seen = {}


class Watch:
    # Notes, when pyarrow is first imported, how many images the run had written by then.
    def find_spec(self, name, path=None, target=None):
        if name == "pyarrow" and "pyarrow" not in seen:
            images = out / "images"
            seen["pyarrow"] = len(list(images.iterdir())) if images.is_dir() else 0
        return None


sys.meta_path.insert(0, Watch())
from imagebatch.cli import main

code = 0
try:
    main(["run", "data/catalog.csv", "--out", str(out), "--simulate"], prog_name="imagebatch")
except SystemExit as stop:
    code = stop.code if isinstance(stop.code, int) else 1
loaded = sorted({m.split(".")[0] for m in sys.modules} & {"pandas", "pyarrow"})
with open(report, "w") as f:
    json.dump({"loaded": loaded, "code": code, "images_before_pyarrow": seen.get("pyarrow")}, f)
"""


def test_a_run_of_a_csv_never_imports_pandas_and_pyarrow_only_after_the_last_image(
    tmp_path, prefect_api
):
    """The run works on plain rows: pandas (about 100 MB) is never imported, and pyarrow
    only to write manifest.parquet, when every image is on disk (not while the run holds
    image payloads in memory)."""
    report, out = tmp_path / "loaded.json", tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-c", RUN_PROBE, str(report), str(out)],
        cwd=ROOT,
        env={**os.environ, "PREFECT_API_URL": prefect_api},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert report.exists(), proc.stderr
    result = json.loads(report.read_text())
    assert result["code"] == 1, proc.stdout + proc.stderr  # the example has one invalid row
    succeeded = sum(1 for line in (out / "manifest.csv").open() if ",succeeded," in line)
    assert succeeded > 0 and len(list((out / "images").iterdir())) == succeeded
    assert (out / "manifest.parquet").is_file()
    assert result["loaded"] == ["pyarrow"]
    assert result["images_before_pyarrow"] == succeeded


@pytest.mark.parametrize("formats", [("csv", "parquet"), ("csv",)], ids=["parquet", "csv"])
def test_report_reads_a_run_folder_without_pandas(tmp_path, formats):
    """`imagebatch report` works on the manifest's rows: manifest.parquet through pyarrow
    (without pandas), or manifest.csv through the csv module (neither)."""
    from imagebatch.tasks.manifest import Manifest, write_manifest
    from imagebatch.tasks.outdir import write_run_json

    folder = tmp_path / "run"
    folder.mkdir()
    rows = [
        {"job_id": "a", "row": 1, "image_index": 0, "model": "gpt-image-2", "status": "failed"},
        {"job_id": "b", "row": 2, "image_index": 0, "model": "gpt-image-2", "status": "invalid"},
    ]
    write_manifest(Manifest.build(rows, []), folder, formats)
    write_run_json(folder, {"run_id": "r1", "seconds": 1.0})
    expected = ["pyarrow"] if "parquet" in formats else []
    assert loaded_by(tmp_path, "report", str(folder)) == expected
    assert (folder / "index.html").is_file()
