"""Run settings: `defaults.toml`, overlaid by a user TOML file, then by flags or Python arguments."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from imagebatch.configs.errors import ConfigError
from imagebatch.configs.registry import parse_size
from imagebatch.configs.tables import merge_tables

DEFAULTS = Path(__file__).with_name("defaults.toml")
OPENAI_BASE_URL = "https://api.openai.com/v1"
# Hosts that speak Azure OpenAI: `api-key` header, /openai/deployments/<name>/..., api-version.
AZURE_HOST_SUFFIXES = (
    ".openai.azure.com",
    ".cognitiveservices.azure.com",
    ".services.ai.azure.com",
)
API_TYPES = ("auto", "openai", "azure")


@dataclass(frozen=True)
class JobDefaults:
    operation: str = "generate"
    model: str = "gpt-image-2"
    size: str = ""
    quality: str = ""
    n: int = 1
    output_format: str = ""
    max_n_per_job: int = 10


@dataclass(frozen=True)
class ApiSettings:
    base_url: str = OPENAI_BASE_URL
    api_key: str | None = field(default=None, repr=False)
    # The name of a Prefect Secret block holding the key (deployed and scheduled runs).
    key_secret: str = ""
    organization: str | None = None
    project: str | None = None
    connect_timeout: float = 10.0
    read_timeout: float = 360.0
    write_timeout: float = 120.0
    pool_timeout: float = 600.0
    max_download_bytes: int = 60_000_000
    # A 2xx answer's body may hold this many bytes per image asked for (plus 1 MB of JSON):
    # the largest legal image (3840x2160 RGBA PNG, worst case 33.2 MB) is 44.3 MB as base64.
    max_response_bytes_per_image: int = 48_000_000
    # Seconds from sending a request to its last byte read: a server dripping its answer
    # cannot hold a request longer than this, whatever read_timeout allows between bytes.
    # 0: connect + write + read timeouts + 120 s, so raising read_timeout raises it too.
    request_deadline: float = 0.0

    @property
    def deadline(self) -> float:
        """The overall deadline of one request, in seconds (see request_deadline)."""
        if self.request_deadline > 0:
            return self.request_deadline
        return self.connect_timeout + self.write_timeout + self.read_timeout + 120.0

    # "auto": Azure when the host is an Azure OpenAI host, OpenAI otherwise.
    api_type: str = "auto"
    api_version: str = "2025-04-01-preview"
    # Azure deployment name per model; a model without one is sent to a deployment of its name.
    deployments: dict[str, str] = field(default_factory=dict)
    # Only an explicit opt-in (--simulate, simulate=True, `simulate = true` in a config)
    # sends a run to the built-in simulator: a missing key must never fake a run.
    simulate: bool = False

    @property
    def is_azure(self) -> bool:
        """Azure's request shape (see AZURE_HOST_SUFFIXES), chosen or detected from the host."""
        if self.api_type != "auto":
            return self.api_type == "azure"
        host = (urlsplit(self.base_url).hostname or "").lower()
        return host.endswith(AZURE_HOST_SUFFIXES)

    @property
    def uses_simulator(self) -> bool:
        """The run was asked to use the built-in simulator."""
        return self.simulate

    @property
    def has_no_target(self) -> bool:
        """No key, no base URL and no simulator opt-in: there is nowhere honest to send requests."""
        return (
            not self.simulate
            and not self.api_key
            and not self.key_secret
            and self.base_url == OPENAI_BASE_URL
        )

    @property
    def targets_openai(self) -> bool:
        """True when requests go to api.openai.com, where retired models are refused outright."""
        return not self.simulate and "api.openai.com" in self.base_url


NO_TARGET_MESSAGE = (
    "no OPENAI_API_KEY and no OPENAI_BASE_URL: set OPENAI_API_KEY to run against OpenAI, "
    "OPENAI_BASE_URL for another server, or pass --simulate for the built-in simulator "
    "(synthetic images, nothing billed)"
)


def check_target(api: ApiSettings) -> None:
    """Refuse a run that has no key, no base URL and no simulator opt-in (usage error, exit 2)."""
    if api.has_no_target:
        raise ConfigError(NO_TARGET_MESSAGE)


@dataclass(frozen=True)
class LimitSettings:
    tier: str = "auto"
    rpm: float = 0
    ipm: float = 0
    max_in_flight: int = 0
    max_in_flight_ceiling: int = 256
    initial_latency: float = 20.0
    # Memory budget: response payload (base64 bodies) expected in flight at once; 0: none.
    max_bytes_in_flight: int = 256_000_000
    # Encoded image bytes per pixel by output_format, until answers teach the real figure.
    bytes_per_pixel: dict[str, float] = field(
        default_factory=lambda: {"png": 3.0, "jpeg": 1.0, "webp": 0.8}
    )
    # What size `auto` (or a size that cannot be read) is assumed to be for the estimate.
    auto_size: str = "1536x1024"


@dataclass(frozen=True)
class RetrySettings:
    max_attempts: int = 8
    max_total_seconds: float = 900.0
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    max_server_hint: float = 120.0
    on_ambiguous: str = "retry"


@dataclass(frozen=True)
class SimulatorSettings:
    latency: float = 0.05
    rpm: float = 0
    ipm: float = 0


@dataclass(frozen=True)
class RegistrySettings:
    # Refuse rows whose model the registry does not know, instead of sending them unchecked.
    strict_models: bool = False


@dataclass(frozen=True)
class FlowSettings:
    # "job": one Prefect task per job, so the UI shows each job's state.
    # "chunk": one task per `chunk_jobs` jobs: Prefect's per-task cost (30-50 ms of CPU,
    # client and server together, more than an image costs a plain SDK loop) paid per chunk.
    # "auto" (default): per job for runs of up to `auto_chunk_above` jobs, chunks above.
    task_per: str = "auto"
    chunk_jobs: int = 100
    auto_chunk_above: int = 100
    # A run where some images did not succeed ends Failed (true) or Completed (false).
    fail_on_image_errors: bool = True

    def uses_chunks(self, jobs: int) -> bool:
        """Whether a fan-out of `jobs` jobs runs as chunk tasks (else one task per job)."""
        if self.task_per not in TASK_PER:
            raise ConfigError(f"[flow] task_per must be one of {', '.join(TASK_PER)}")
        if self.task_per == "auto":
            return jobs > self.auto_chunk_above
        return self.task_per == "chunk"


TASK_PER = ("auto", "job", "chunk")


@dataclass(frozen=True)
class CostSettings:
    # USD; 0 means no cap. max_cost caps one run; max_cost_total caps the output folder,
    # counting what earlier runs into it spent.
    max_cost: float = 0.0
    max_cost_total: float = 0.0
    # A TOML file overlaying configs/prices.toml (empty: the bundled prices only).
    prices: str = ""


@dataclass(frozen=True)
class InputSettings:
    """How source images and masks for edits and variations are prepared and found."""

    # Where the model needs a square: "crop" (centre), "pad" or "error". Empty: pad for
    # edits (the padding kept out of the repaint area), crop for variations.
    fit: str = ""
    pad_color: str = "white"  # a colour name, #rrggbb, or "transparent" (padding is repainted)
    mask_repaint: str = "white"  # in a black-and-white mask, this colour marks "repaint here"
    # Relative sources resolve here and must stay inside it (default: the jobs file's folder).
    sources_root: str = ""
    allow_outside_sources: bool = False
    max_source_pixels: int = 89_478_485  # decompression-bomb guard (Pillow's default)
    keep_prepared: bool = False  # write the bytes sent to <out>/prepared/ for audit


@dataclass(frozen=True)
class GallerySettings:
    # index.html, thumbs/ and metadata.jsonl at the end of every run (and `imagebatch report`).
    enabled: bool = True
    thumb_size: int = 256
    thumb_format: str = "webp"
    # > 0: also write contact_sheet.png with the first this-many succeeded images.
    contact_sheet: int = 0


@dataclass(frozen=True)
class BatchSettings:
    # "live": requests go out one by one under the rate limits. "batch": through the Batch
    # API (half price, results within its 24-hour window).
    mode: str = "live"
    wait: bool = True  # false: submit, record, exit; a rerun of the same command collects
    poll_seconds: float = 30.0
    max_lines: int = 50_000  # per input file (the API's limit)
    max_bytes: int = 200_000_000  # per input file (the API's limit is 200 MB)
    not_batchable: str = "live"  # rows the Batch API cannot carry: "live" or "refuse"
    retry_lines: str = "batch"  # lines failed transiently: retried in a new "batch" or "live"
    max_rounds: int = 3  # batches an image may go through before its failure stands


@dataclass(frozen=True)
class Settings:
    job: JobDefaults = field(default_factory=JobDefaults)
    api: ApiSettings = field(default_factory=ApiSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    retry: RetrySettings = field(default_factory=RetrySettings)
    simulator: SimulatorSettings = field(default_factory=SimulatorSettings)
    flow: FlowSettings = field(default_factory=FlowSettings)
    inputs: InputSettings = field(default_factory=InputSettings)
    cost: CostSettings = field(default_factory=CostSettings)
    registry: RegistrySettings = field(default_factory=RegistrySettings)
    gallery: GallerySettings = field(default_factory=GallerySettings)
    batch: BatchSettings = field(default_factory=BatchSettings)
    output_dir: str = "out"
    manifest_formats: tuple[str, ...] = ("csv", "parquet")
    tiers: dict[str, dict[str, float]] = field(default_factory=dict)

    def with_overrides(self, section: str, **values: Any) -> Settings:
        """A copy with some fields of one section replaced; None values are ignored."""
        values = {k: v for k, v in values.items() if v is not None}
        if not values:
            return self
        current = getattr(self, section)
        known = {f.name for f in fields(current)}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"unknown [{section}] settings: {sorted(unknown)}")
        return replace(self, **{section: replace(current, **values)})


def _section(cls: type, raw: dict[str, Any], name: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"unknown [{name}] settings in config: {sorted(unknown)}")
    try:
        return cls(**raw)
    except TypeError as exc:
        raise ConfigError(f"bad [{name}] settings: {exc}") from None


def load_settings(
    config_file: str | Path | None = None, env: dict[str, str] | None = None
) -> Settings:
    """Defaults, then `config_file`, then the OpenAI environment variables the official SDK reads."""
    environ: Mapping[str, str] = os.environ if env is None else env
    raw = _read_config(config_file)
    api = _api_section(raw, environ)
    output = raw.get("output", {})
    settings = Settings(
        job=_section(JobDefaults, raw.get("job", {}), "job"),
        api=_section(ApiSettings, api, "api"),
        limits=_section(LimitSettings, raw.get("limits", {}), "limits"),
        retry=_section(RetrySettings, raw.get("retry", {}), "retry"),
        simulator=_section(SimulatorSettings, raw.get("simulator", {}), "simulator"),
        flow=_section(FlowSettings, raw.get("flow", {}), "flow"),
        inputs=_section(InputSettings, raw.get("inputs", {}), "inputs"),
        cost=_section(CostSettings, raw.get("cost", {}), "cost"),
        registry=_section(RegistrySettings, raw.get("registry", {}), "registry"),
        gallery=_section(GallerySettings, raw.get("gallery", {}), "gallery"),
        batch=_section(BatchSettings, raw.get("batch", {}), "batch"),
        output_dir=output.get("dir", "out"),
        manifest_formats=tuple(output.get("manifest_formats", ("csv", "parquet"))),
        tiers=raw.get("tiers", {}),
    )
    _check(settings)
    return settings


def _read_config(config_file: str | Path | None) -> dict[str, Any]:
    """The bundled defaults with `config_file` merged over them."""
    raw = tomllib.loads(DEFAULTS.read_text(encoding="utf-8"))
    if config_file:
        path = Path(config_file)
        try:
            raw = merge_tables(raw, tomllib.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    return raw


def _api_section(raw: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """[api] from the config, then the environment variables the official SDKs read."""
    api = dict(raw.get("api", {}))
    if "simulate" in raw:  # a top-level `simulate = true` reads as [api] simulate
        api["simulate"] = raw["simulate"]
    if environ.get("OPENAI_BASE_URL"):
        api["base_url"] = environ["OPENAI_BASE_URL"]
    elif environ.get("AZURE_OPENAI_ENDPOINT"):  # as the official SDK's AzureOpenAI reads it
        api["base_url"] = environ["AZURE_OPENAI_ENDPOINT"]
    api["api_key"] = environ.get("OPENAI_API_KEY") or environ.get("AZURE_OPENAI_API_KEY") or None
    api["organization"] = environ.get("OPENAI_ORG_ID") or None
    api["project"] = environ.get("OPENAI_PROJECT_ID") or None
    if environ.get("OPENAI_API_VERSION"):
        api["api_version"] = environ["OPENAI_API_VERSION"]
    return api


def _check(settings: Settings) -> None:
    """Refuse values that would only fail later."""
    if not isinstance(settings.api.simulate, bool):
        raise ConfigError("simulate must be true or false")
    if settings.retry.on_ambiguous not in ("retry", "fail"):
        raise ConfigError("[retry] on_ambiguous must be 'retry' or 'fail'")
    if settings.cost.max_cost < 0 or settings.cost.max_cost_total < 0:
        raise ConfigError("[cost] max_cost and max_cost_total must be 0 (no cap) or more")
    flow = settings.flow
    if flow.task_per not in TASK_PER or flow.chunk_jobs < 1 or flow.auto_chunk_above < 0:
        raise ConfigError(
            f"[flow] task_per must be one of {', '.join(TASK_PER)}, chunk_jobs at least 1 "
            "and auto_chunk_above 0 or more"
        )
    if settings.api.max_response_bytes_per_image < 1024 or settings.api.request_deadline < 0:
        raise ConfigError(
            "[api] max_response_bytes_per_image must be at least 1024, request_deadline 0 "
            "(derived from the timeouts) or more"
        )
    if settings.api.api_type not in API_TYPES:
        raise ConfigError(f"[api] api_type must be one of {', '.join(API_TYPES)}")
    deployments = settings.api.deployments
    if not isinstance(deployments, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in deployments.items()
    ):
        raise ConfigError(
            '[api.deployments] maps model names to deployment names: "model" = "name"'
        )
    check_inputs(settings.inputs)
    check_limits(settings.limits)
    gallery = settings.gallery
    if gallery.thumb_format not in ("webp", "jpeg") or not 16 <= gallery.thumb_size <= 1024:
        raise ConfigError("[gallery] thumb_format must be 'webp' or 'jpeg', thumb_size 16 to 1024")
    if gallery.contact_sheet < 0:
        raise ConfigError("[gallery] contact_sheet must be 0 (off) or a number of images")
    check_batch(settings.batch)


def check_inputs(inputs: InputSettings) -> None:
    """Refuse [inputs] values that would only fail later, row by row."""
    if inputs.fit not in ("", "crop", "pad", "error"):
        raise ConfigError("[inputs] fit must be crop, pad, error or empty")
    if inputs.mask_repaint not in ("white", "black"):
        raise ConfigError("[inputs] mask_repaint must be 'white' or 'black'")
    if inputs.max_source_pixels < 1:
        raise ConfigError("[inputs] max_source_pixels must be positive")


def check_limits(limits: LimitSettings) -> None:
    """Refuse a memory budget or size table the limiter could not use."""
    if not isinstance(limits.max_bytes_in_flight, int) or limits.max_bytes_in_flight < 0:
        raise ConfigError("[limits] max_bytes_in_flight must be 0 (no budget) or a byte count")
    bpp = limits.bytes_per_pixel
    if not isinstance(bpp, dict) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in bpp.values()
    ):
        raise ConfigError("[limits.bytes_per_pixel] maps formats to positive numbers: png = 3.0")
    parsed = parse_size(str(limits.auto_size))
    if parsed is None or 0 in parsed:
        raise ConfigError(f"[limits] auto_size must be WxH, got {limits.auto_size!r}")


def check_batch(b: BatchSettings) -> None:
    if b.mode not in ("live", "batch"):
        raise ConfigError("[batch] mode must be 'live' or 'batch'")
    if b.not_batchable not in ("live", "refuse") or b.retry_lines not in ("batch", "live"):
        raise ConfigError(
            "[batch] not_batchable must be 'live' or 'refuse', retry_lines 'batch' or 'live'"
        )
    if b.max_lines < 1 or b.max_bytes < 1024 or b.max_rounds < 1 or b.poll_seconds <= 0:
        raise ConfigError(
            "[batch] max_lines and max_rounds must be at least 1, max_bytes at least 1024, "
            "poll_seconds above 0"
        )


SECTIONS = {
    "job": JobDefaults,
    "api": ApiSettings,
    "limits": LimitSettings,
    "retry": RetrySettings,
    "simulator": SimulatorSettings,
    "flow": FlowSettings,
    "inputs": InputSettings,
    "cost": CostSettings,
    "registry": RegistrySettings,
    "gallery": GallerySettings,
    "batch": BatchSettings,
}
# Never a run argument: keys come from the environment only, so they cannot land in a
# Prefect flow run's parameters.
NOT_OVERRIDABLE = {"api_key"}


def route_overrides(overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Sort flat overrides (model=..., ipm=...) into their sections; None means "not given"."""
    sections: dict[str, dict[str, Any]] = {}
    for name, value in overrides.items():
        if value is None:
            continue
        for section, cls in SECTIONS.items():
            if name in {f.name for f in fields(cls)} - NOT_OVERRIDABLE:
                sections.setdefault(section, {})[name] = value
                break
        else:
            raise ConfigError(f"unknown setting {name!r}")
    return sections


def resolve_limits(settings: Settings) -> LimitSettings:
    """The limits with the tier preset applied under any explicitly set rpm/ipm."""
    lim = settings.limits
    if lim.tier not in settings.tiers:
        raise ConfigError(f"unknown limits tier {lim.tier!r}; known: {sorted(settings.tiers)}")
    preset = settings.tiers[lim.tier]
    return replace(
        lim,
        rpm=lim.rpm or float(preset.get("rpm", 0)),
        ipm=lim.ipm or float(preset.get("ipm", 0)),
    )
