"""Azure OpenAI: detected from the host or chosen in config; api-key, deployment path, api-version."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pandas as pd
import pytest

from imagebatch.configs.registry import Registry
from imagebatch.configs.settings import ApiSettings, JobDefaults, load_settings
from imagebatch.tasks.api_client import ImagesClient
from imagebatch.tasks.plan import plan_jobs, units_for
from imagebatch.tasks.read_jobs import read_jobs
from imagebatch.tasks.validate import Validator

KEY = "azure-test-key-0123456789"


def _units(rows: list[dict], deployments: dict[str, str] | None = None):
    checked = Validator(
        Registry.load(), JobDefaults(), targets_openai=False, deployments=deployments
    ).check(read_jobs(pd.DataFrame(rows)))
    assert not checked.invalid, checked.problems
    return [u for p in plan_jobs(checked.valid) for u in units_for(p, range(p.job.n))]


def _build(api: ApiSettings, unit):
    client = ImagesClient(api)
    try:
        return client.build_request(unit)
    finally:
        asyncio.run(client.aclose())


@pytest.mark.parametrize(
    "base_url",
    [
        "https://res1.openai.azure.com",
        "https://res1.openai.azure.com/openai/",
        "https://res1.cognitiveservices.azure.com",
        "https://res1.services.ai.azure.com/openai",
    ],
)
def test_azure_hosts_get_key_header_deployment_path_and_api_version(base_url):
    api = ApiSettings(base_url=base_url, api_key=KEY, api_version="2025-04-01-preview")
    assert api.is_azure
    unit = _units([{"prompt": "x", "model": "gpt-image-2"}], {"gpt-image-2": "img prod"})[0]
    request = _build(api, unit)
    assert request.headers["api-key"] == KEY and "authorization" not in request.headers
    assert (
        request.url.raw_path.split(b"?")[0] == b"/openai/deployments/img%20prod/images/generations"
    )
    assert request.url.params["api-version"] == "2025-04-01-preview"


def test_azure_v1_shape_names_the_deployment_in_model():
    api = ApiSettings(base_url="https://res1.openai.azure.com/openai/v1/", api_key=KEY)
    unit = _units([{"prompt": "x", "model": "gpt-image-2", "deployment": "mine"}])[0]
    request = _build(api, unit)
    assert request.url.path == "/openai/v1/images/generations"
    assert b'"model":"mine"' in request.content.replace(b" ", b"")


@pytest.mark.parametrize(
    "base_url, api_type, azure",
    [
        ("https://api.openai.com/v1", "auto", False),
        ("https://evil.openai.azure.com.example.org/v1", "auto", False),
        ("http://127.0.0.1:9/", "azure", True),
        ("https://res1.openai.azure.com", "openai", False),
    ],
)
def test_azure_detection_and_explicit_choice(base_url, api_type, azure):
    assert ApiSettings(base_url=base_url, api_type=api_type).is_azure is azure


def test_openai_shape_sends_bearer_and_no_api_key(tmp_path: Path):
    api = ApiSettings(base_url="https://api.openai.com/v1", api_key=KEY)
    unit = _units([{"prompt": "x", "model": "gpt-image-2"}])[0]
    request = _build(api, unit)
    assert request.headers["authorization"] == f"Bearer {KEY}" and "api-key" not in request.headers
    assert request.url.path == "/v1/images/generations" and not request.url.params


def test_azure_environment_variables_of_the_official_sdk():
    env = {
        "AZURE_OPENAI_ENDPOINT": "https://res9.openai.azure.com/",
        "AZURE_OPENAI_API_KEY": KEY,
        "OPENAI_API_VERSION": "2024-10-21",
    }
    api = load_settings(env=env).api
    assert api.is_azure and api.api_key == KEY and api.api_version == "2024-10-21"
    # the OpenAI variables win when both are set
    api = load_settings(env={**env, "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}).api
    assert not api.is_azure
