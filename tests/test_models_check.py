"""`imagebatch models --check` against a real server on loopback."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from imagebatch.cli import main
from imagebatch.configs.registry import Registry
from imagebatch.simulator import SimConfig, SimulatorServer

KEY = "sk-models-check-0123456789abcdef"
EXTRA = """
[models."gpt-image-3-preview"]
endpoints = ["generate"]
sizes = ["1024x1024"]

[models."text-embedding-9"]
endpoints = ["generate"]
sizes = ["1024x1024"]
"""


@pytest.fixture(scope="module")
def other_server(tmp_path_factory):
    """A server that dropped dall-e-2, serves a gpt-image-2 snapshot and two models we lack."""
    overlay = tmp_path_factory.mktemp("reg") / "server.toml"
    overlay.write_text(EXTRA, encoding="utf-8")
    models = dict(Registry.load(overlay).models)
    del models["dall-e-2"]
    snapshot = Registry.load().get("gpt-image-2-2026-04-21")
    assert snapshot is not None
    models[snapshot.name] = snapshot
    with SimulatorServer(SimConfig(latency=0.0, api_key=KEY), registry=Registry(models)) as sim:
        yield sim


def invoke(args: list[str], env: dict[str, str]):
    return CliRunner().invoke(main, args, env=env, catch_exceptions=False)


def test_check_lists_served_unknown_and_missing(other_server):
    result = invoke(
        ["models", "--check"], {"OPENAI_BASE_URL": other_server.base_url, "OPENAI_API_KEY": KEY}
    )
    assert result.exit_code == 0, result.output
    text = result.output
    served = text.split("Registry models it serves")[1].split("Image models")[0]
    unknown = text.split("registry does not know")[1].split("Registry models it does not list")[0]
    missing = text.split("Registry models it does not list")[1]
    assert "gpt-image-2.5-flare" in served and "gpt-image-2\n" in served
    assert "gpt-image-2-2026-04-21 (snapshot of gpt-image-2)" in served
    assert "gpt-image-3-preview" in unknown and "text-embedding-9" not in text
    assert "--models" in unknown
    assert "dall-e-2 (retired on api.openai.com 2026-05-12)" in missing
    assert "gpt-image-2.5" not in missing


def test_check_says_clearly_when_the_server_has_no_model_list(other_server):
    base = other_server.base_url.removesuffix("/v1") + "/compat/v1"
    result = invoke(["models", "--check", "--base-url", base], {"OPENAI_API_KEY": KEY})
    assert result.exit_code == 2
    assert "has no GET /models endpoint" in result.output
    # the URL it names has its credentials masked
    with_password = base.replace("http://", "http://proxyuser:pr0xy-pa55word@")
    result = invoke(["models", "--check", "--base-url", with_password], {"OPENAI_API_KEY": KEY})
    assert result.exit_code == 2 and "has no GET /models endpoint" in result.output
    assert "pr0xy-pa55word" not in result.output and "[redacted]@" in result.output


def test_check_reports_a_refused_key_and_never_prints_it(other_server):
    wrong = "sk-wrong-key-abcdefghijklmnop"
    result = invoke(
        ["models", "--check"], {"OPENAI_BASE_URL": other_server.base_url, "OPENAI_API_KEY": wrong}
    )
    assert result.exit_code == 2
    assert "401" in result.output and "invalid_api_key" in result.output
    assert "abcdefghijklmnop" not in result.output


def test_check_needs_a_target():
    result = invoke(["models", "--check"], {})
    assert result.exit_code == 2 and "needs a target" in result.output


def test_list_shows_current_models(tmp_path: Path):
    result = invoke(["models"], {"COLUMNS": "200"})
    assert result.exit_code == 0 and "gpt-image-2.5-sunburst" in result.output


def test_check_against_an_azure_resource_uses_its_list_and_api_key(other_server, tmp_path):
    config = tmp_path / "azure.toml"
    config.write_text(
        f'[api]\nbase_url = "{other_server.url}"\napi_type = "azure"\n', encoding="utf-8"
    )
    result = invoke(["models", "--check", "--config", str(config)], {"OPENAI_API_KEY": KEY})
    assert result.exit_code == 0, result.output
    assert "/openai/models lists" in result.output and "gpt-image-3-preview" in result.output
