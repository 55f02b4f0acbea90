"""The simulator is used only when asked: from Python, and for a deployed (scheduled) flow."""

from __future__ import annotations

import asyncio

import pandas as pd
import pytest

import imagebatch
from imagebatch.flows.run_jobs import imagebatch_flow
from imagebatch.tasks.errors import ConfigError


def test_python_api_refuses_without_a_target_and_runs_with_simulate(prefect_api, tmp_path):
    df = pd.DataFrame({"prompt": ["a lighthouse"], "model": ["gpt-image-2"]})
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="--simulate"):
        imagebatch.run(df, out=out)
    assert not out.exists()
    manifest = imagebatch.run(df, out=out, simulate=True)
    assert manifest.status.tolist() == ["succeeded"]
    assert manifest.attrs["imagebatch"]["exit_code"] == 0


def test_a_deployed_flow_with_a_missing_key_does_not_fake_a_run(prefect_api, tmp_path):
    jobs = tmp_path / "jobs.csv"
    pd.DataFrame({"prompt": ["x"]}).to_csv(jobs, index=False)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="--simulate"):
        asyncio.run(imagebatch_flow(str(jobs), str(out)))
    assert not (out / "images").exists()
