"""Model check: compare the registry with the models a server says it serves (`GET /models`).

The registry always lags the provider; this tells a user which of its entries a target
serves, which image models the target serves that the registry does not know (they run
unchecked), and which entries the target no longer lists.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import httpx

from imagebatch.configs.registry import Registry
from imagebatch.configs.settings import ApiSettings
from imagebatch.tasks.api_client import auth_headers, azure_root
from imagebatch.tasks.errors import ApiError
from imagebatch.tasks.redact import mask_url, secrets_of
from imagebatch.tasks.retry import error_from_response, error_from_transport

# Model ids that look like image models (the list endpoint does not say what a model does).
IMAGE_LIKE = re.compile(
    r"image|dall-e|dalle|flux|stable-diffusion|sdxl|sd3|imagen|ideogram|recraft|kandinsky|playground",
    re.I,
)
LIST_TIMEOUT = 30.0


class NoModelList(ApiError):
    """The target has no usable `GET /models` endpoint."""


@dataclass
class ModelCheck:
    url: str
    listed: int
    served: list[str] = field(default_factory=list)  # registry entries (or their snapshots) listed
    unknown: list[str] = field(default_factory=list)  # image-looking ids the registry lacks
    missing: list[str] = field(default_factory=list)  # registry entries not listed


def models_url(api: ApiSettings) -> tuple[str, dict[str, str]]:
    """The list endpoint of `api`'s target, and its query (Azure wants an api-version)."""
    if api.is_azure:
        root, _ = azure_root(api.base_url)
        return root.rstrip("/") + "/models", {"api-version": api.api_version}
    return api.base_url.rstrip("/") + "/models", {}


def fetch_model_ids(api: ApiSettings, transport: httpx.BaseTransport | None = None) -> list[str]:
    """The ids the target lists. NoModelList when it has no such endpoint; ApiError otherwise."""
    url, query = models_url(api)
    timeout = httpx.Timeout(LIST_TIMEOUT, connect=api.connect_timeout)
    try:
        with httpx.Client(headers=auth_headers(api), timeout=timeout, transport=transport) as http:
            response = http.get(url, params=query)
    except httpx.TransportError as exc:
        raise error_from_transport(exc, secrets_of(api.api_key, api.base_url)) from None
    if response.status_code in (404, 405, 501):
        raise NoModelList(
            f"{mask_url(url)} answered HTTP {response.status_code}: this server has no GET /models "
            "endpoint, so its models cannot be listed",
            status=response.status_code,
        )
    if response.status_code >= 400:
        raise error_from_response(
            response.status_code,
            response.headers,
            response.content,
            secrets_of(api.api_key, api.base_url),
        )
    try:
        data = response.json().get("data")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        data = None
    if not isinstance(data, list):
        raise NoModelList(
            f'{mask_url(url)} answered, but not with a model list ({{"data": [...]}}); '
            "this server's models cannot be listed",
            status=response.status_code,
        )
    return [d["id"] for d in data if isinstance(d, dict) and isinstance(d.get("id"), str)]


def compare(registry: Registry, ids: list[str], url: str = "") -> ModelCheck:
    """Sort the listed ids against the registry (a listed dated snapshot counts as its own name)."""
    listed = set(ids)
    check = ModelCheck(url, len(listed))
    for name in sorted(listed):
        spec = registry.get(name)
        if spec is not None:
            check.served.append(name if spec.base is None else f"{name} (snapshot of {spec.base})")
        elif IMAGE_LIKE.search(name):
            check.unknown.append(name)
    for name in registry.names():
        if name not in listed:
            spec = registry.get(name)
            retired = spec.retired if spec is not None else None
            check.missing.append(
                f"{name} (retired on api.openai.com {retired.isoformat()})" if retired else name
            )
    return check


def check_models(
    api: ApiSettings, registry: Registry, transport: httpx.BaseTransport | None = None
) -> ModelCheck:
    ids = fetch_model_ids(api, transport)
    return compare(registry, ids, mask_url(models_url(api)[0]))
