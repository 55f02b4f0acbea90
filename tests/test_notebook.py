"""The notebook API in a real Jupyter kernel (ipykernel, driven by nbclient), where an event
loop already runs: notebooks/quickstart.ipynb executes top to bottom, and the API itself is
checked cell by cell (progress bar, a second run reusing Prefect's API, `await arun`, a
concurrent run into the same folder refused)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One PREFECT_HOME for this module's kernels: its database is migrated once."""
    return tmp_path_factory.mktemp("prefect-home")


@pytest.fixture
def kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_home: Path) -> dict[str, Any]:
    """A kernelspec for this interpreter, and a clean environment for the kernel."""
    spec = tmp_path / "jupyter" / "kernels" / "imagebatch-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "imagebatch test",
                "language": "python",
            }
        )
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    # No Prefect server, as a new user has it (the kernel serves Prefect's API); its own home.
    env.update(
        PREFECT_HOME=str(prefect_home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        # A fresh database migrates first; on a loaded 2-core machine that can take a while.
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
    )
    work = tmp_path / "work"
    work.mkdir()
    return {"env": env, "cwd": work}


def execute(nb: Any, kernel: dict[str, Any]) -> Any:
    client = NotebookClient(
        nb,
        kernel_name="imagebatch-test",
        timeout=300,
        startup_timeout=120,
        resources={"metadata": {"path": str(kernel["cwd"])}},
    )
    client.execute(env=kernel["env"])
    return nb


def outputs(cell: Any, kind: str) -> str:
    """All text of one MIME type (or stream) in a cell's outputs."""
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream" and kind == "stream":
            parts.append(out["text"])
        elif kind in out.get("data", {}):
            parts.append(str(out["data"][kind]))
    return "\n".join(parts)


def test_quickstart_notebook_runs_in_a_real_kernel(kernel):
    nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    execute(nb, kernel)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not any(o.get("output_type") == "error" for c in code for o in c.get("outputs", []))
    run_cell = next(c for c in code if "imagebatch.run(" in c.source)
    # The progress bar (HTML, no widgets) ended at its final count.
    html = outputs(run_cell, "text/html")
    assert '<progress value="5" max="5"' in html
    assert "succeeded 4" in html and "rejected 1" in html
    # Prefect's per-run log lines stay out of the notebook.
    assert "Finished in state" not in outputs(run_cell, "stream")
    assert "'succeeded': 4" in outputs(run_cell, "text/plain")
    images = next(c for c in code if "display(Image" in c.source)
    assert outputs(images, "image/png").count("iVBOR") == 3  # three PNGs shown inline
    failed = next(c for c in code if 'manifest["status"] != "succeeded"' in c.source)
    table = outputs(failed, "text/plain")
    assert "LAMP-2" in table and "BAD-1" in table and "MUG-RED" not in table
    again = next(c for c in code if "await imagebatch.arun" in c.source)
    assert "'succeeded': 4" in outputs(again, "text/plain")
    manifest = kernel["cwd"] / "quickstart-out" / "manifest.csv"
    assert manifest.is_file()


KERNEL_CELLS = [
    # 0: a loop is running here, as in every notebook
    "import asyncio, os, pathlib, pandas as pd, imagebatch\nasyncio.get_running_loop() is not None",
    # 1: the first run
    "jobs = pd.DataFrame({'prompt': [f'mug {i}' for i in range(8)], 'sku': range(8)})\n"
    "m1 = imagebatch.run(jobs, out='a', simulate=True)\n"
    "print(m1.attrs['imagebatch']['counts']['succeeded'], len(m1))",
    # 2: which Prefect API server processes does this kernel run, which API does it serve?
    "def api_servers():\n"
    "    me = str(os.getpid()); found = []\n"
    "    for p in pathlib.Path('/proc').iterdir():\n"
    "        try:\n"
    "            ppid = (p / 'stat').read_text().rsplit(')', 1)[1].split()[1]\n"
    "            cmd = (p / 'cmdline').read_bytes().replace(b'\\0', b' ').decode()\n"
    "        except (OSError, IndexError):\n"
    "            continue\n"
    "        if ppid == me and 'prefect' in cmd and 'server' in cmd:\n"
    "            found.append(p.name)\n"
    "    return sorted(found)\n"
    "from imagebatch.flows import prefect_inprocess\n"
    "first = api_servers(); url = prefect_inprocess.served(); print(len(first), url is not None)",
    # 3: a second run reuses it
    "m2 = imagebatch.run(jobs.assign(prompt=jobs.prompt + ' again'), out='b', simulate=True)\n"
    "print(m2.attrs['imagebatch']['counts']['succeeded'], api_servers() == first,\n"
    "      prefect_inprocess.served() == url)",
    # 4: async code, and two runs into one folder at once: the second is refused
    "r = await asyncio.gather(\n"
    "    imagebatch.arun(jobs, out='c', simulate=True, progress=False),\n"
    "    imagebatch.arun(jobs, out='c', simulate=True, progress=False),\n"
    "    return_exceptions=True)\n"
    "print(sorted(type(x).__name__ for x in r))",
    # 5: the kernel's loop still works
    "await asyncio.sleep(0); print('loop ok')",
]


def test_api_in_a_kernel_uses_its_own_loop_and_one_prefect_api(kernel):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in KERNEL_CELLS]
    execute(nb, kernel)
    out = [outputs(c, "stream") + outputs(c, "text/plain") for c in nb.cells]
    assert "True" in out[0]
    assert out[1].split()[:2] == ["8", "8"]
    # No Prefect server process: the kernel serves Prefect's API itself, started once ...
    assert out[2].split() == ["0", "True"]
    assert out[3].split()[:3] == ["8", "True", "True"]  # ... and it served the second run too
    # The hint to start a background server comes with the first run only.
    hint = "prefect server start --background` makes later runs start in about 2 s"
    assert hint in outputs(nb.cells[1], "text/html")
    assert hint not in outputs(nb.cells[3], "text/html")
    assert "['DataFrame', 'RunLocked']" in out[4]
    assert "loop ok" in out[5]


@pytest.mark.parametrize("api", ["in-process", "server"])
def test_a_kernel_interrupt_stops_the_run_as_ctrl_c_does(kernel, api, request):
    """The kernel's interrupt (SIGINT, KeyboardInterrupt in the main thread) reaches the run
    in its worker thread: requests in flight finish, the rest are not run, the manifest is
    written, and the cell returns normally. The Prefect API the kernel serves from a thread
    (no server configured) must survive the interrupt too, and so must a child server
    process where there is one: Jupyter signals the kernel's whole process group."""
    from jupyter_client.manager import start_new_kernel

    env = dict(kernel["env"])
    if api == "server":
        env["PREFECT_API_URL"] = request.getfixturevalue("prefect_server").url
    km, kc = start_new_kernel(kernel_name="imagebatch-test", env=env, cwd=str(kernel["cwd"]))
    try:
        kc.execute_interactive("import imagebatch, pandas as pd", timeout=120)
        code = (
            "jobs = pd.DataFrame({'prompt': [f'mug {i}' for i in range(40)]})\n"
            "m = imagebatch.run(jobs, out='slow', simulate=True, latency=2.0, max_in_flight=2,"
            " progress=False)\n"
            "print('stopped:', m.attrs['imagebatch']['stopped'])\n"
            "print('counts:', m.attrs['imagebatch']['counts'])"
        )
        msg_id = kc.execute(code)
        journal = kernel["cwd"] / "slow" / "journal.jsonl"
        deadline = time.monotonic() + 180
        while not (journal.exists() and journal.read_text().count("\n") >= 1):
            assert time.monotonic() < deadline, "the run never finished an image"
            time.sleep(0.2)
        km.interrupt_kernel()
        printed = []
        while True:
            msg = kc.get_iopub_msg(timeout=180)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                printed.append(msg["content"]["text"])
            if msg["msg_type"] == "error":
                c = msg["content"]
                pytest.fail(f"the cell raised {c['ename']}: {c['evalue']} {c['traceback'][-4:]}")
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    text = "".join(printed)
    assert "stopped: interrupted" in text
    manifest = pd.read_csv(kernel["cwd"] / "slow" / "manifest.csv")
    counts = manifest["status"].value_counts().to_dict()
    assert counts.get("succeeded", 0) >= 1 and counts.get("not_run", 0) >= 1
    assert sum(counts.values()) == 40
