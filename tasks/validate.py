"""Validation: every row is checked against its model's rules before any request is sent.

A row that breaks a rule becomes a `Problem` naming the row, the column and the rule, and
an `invalid` row in the manifest; the other rows run. A row that passes becomes a
`ValidJob` holding exactly the parameters that will be sent.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagebatch.configs.registry import CHOICES, OPERATIONS, ModelSpec, Registry, unchecked
from imagebatch.configs.settings import InputSettings, JobDefaults, Settings
from imagebatch.tasks.prepare import (
    FITS,
    PrepOptions,
    SourceError,
    SourceImage,
    check_mask_shape,
    check_pad_color,
    input_rules,
    inspect_source,
    resolve_source,
)
from imagebatch.tasks.read_jobs import IMAGE_SEPARATOR, Job

# Columns that map one-to-one onto an optional API parameter of the same name.
PASS_THROUGH = (
    "style",
    "background",
    "output_format",
    "output_compression",
    "moderation",
    "input_fidelity",
    "user",
)
RETIREMENT_WARNING_DAYS = 30
# ASCII digits only: Python's int()/float() also read "1_0", full-width and Arabic-Indic
# digits, "inf" and "nan", none of which a jobs file should mean as a count.
_WHOLE = re.compile(r"^[+-]?[0-9]+(?:\.0*)?$", re.ASCII)


def whole_number(text: str) -> int | None:
    """The whole number `text` spells in ASCII digits ("3", "3.0"), or None."""
    text = text.strip()
    return int(text.split(".")[0]) if _WHOLE.match(text) else None


@dataclass(frozen=True)
class Problem:
    row: int
    column: str
    message: str
    severity: str = "error"  # or "warning": reported, the row still runs

    def __str__(self) -> str:
        return f"row {self.row}, column '{self.column}': {self.message}"


@dataclass
class ValidJob:
    """A checked row: `params` are the API parameters to send, minus `n` and the files."""

    job: Job
    job_id: str
    operation: str
    model: ModelSpec
    n: int
    params: dict[str, Any]
    images: list[SourceImage] = field(default_factory=list)
    mask: SourceImage | None = None
    # Azure deployment to send to: the row's `deployment`, the config map, or the model name.
    deployment: str = ""
    prep: PrepOptions | None = None  # how the sources are prepared (edits and variations)


@dataclass
class Checked:
    valid: list[ValidJob]
    invalid: dict[int, list[Problem]]  # row -> its errors
    warnings: list[Problem]

    @property
    def problems(self) -> list[Problem]:
        errors = [p for ps in self.invalid.values() for p in ps]
        return sorted(errors + self.warnings, key=lambda p: (p.row, p.severity))


class Validator:
    def __init__(
        self,
        registry: Registry,
        defaults: JobDefaults,
        *,
        targets_openai: bool,
        base_dir: Path | None = None,
        today: dt.date | None = None,
        strict_models: bool = False,
        deployments: dict[str, str] | None = None,
        inputs: InputSettings | None = None,
    ) -> None:
        self.registry = registry
        self.defaults = defaults
        self.targets_openai = targets_openai
        self.base_dir = base_dir or Path.cwd()
        self.today = today or dt.date.today()
        self.strict_models = strict_models
        self.deployments = deployments or {}
        self._unknown: dict[str, list[int]] = {}
        self.inputs = inputs or InputSettings()
        # One full decode per file, however many rows name it.
        self._inspected: dict[Path, SourceImage | SourceError] = {}

    @classmethod
    def from_settings(
        cls, registry: Registry, settings: Settings, *, targets_openai: bool, base_dir: Path
    ) -> Validator:
        """The validator a run with `settings` uses (one place, so run, validate and
        --dry-run judge rows alike)."""
        return cls(
            registry,
            settings.job,
            targets_openai=targets_openai,
            base_dir=base_dir,
            strict_models=settings.registry.strict_models,
            deployments=settings.api.deployments,
            inputs=settings.inputs,
        )

    def check(self, jobs: list[Job]) -> Checked:
        valid: list[ValidJob] = []
        invalid: dict[int, list[Problem]] = {}
        warnings: list[Problem] = []
        seen_ids: dict[str, int] = {}
        self._unknown = {}
        for job in jobs:
            errs: list[Problem] = []
            warns: list[Problem] = []
            explicit_id = job.get("id")
            if explicit_id:
                if explicit_id in seen_ids:
                    errs.append(
                        Problem(
                            job.row,
                            "id",
                            f"id {explicit_id!r} is already used by row {seen_ids[explicit_id]}; ids must be unique",
                        )
                    )
                else:
                    seen_ids[explicit_id] = job.row
            result = self._check_row(job, errs, warns)
            warnings.extend(warns)
            if errs or result is None:
                invalid[job.row] = errs or [Problem(job.row, "", "row is invalid")]
            else:
                valid.append(result)
        warnings.extend(self._unknown_model_warnings())
        return Checked(valid, invalid, warnings)

    def _unknown_model_warnings(self) -> list[Problem]:
        """One warning per model the registry does not know, on the first row that names it."""
        out = []
        for name, rows in self._unknown.items():
            listed = ", ".join(str(r) for r in rows[:10]) + (", …" if len(rows) > 10 else "")
            out.append(
                Problem(
                    rows[0],
                    "model",
                    f"{name!r} is not in the model registry: {len(rows)} row(s) ({listed}) are sent "
                    "unchecked (only prompt, n, source files and value types were checked; the "
                    "server judges the rest, one image per call). To check its rules, add it to a "
                    "models TOML file passed with --models or IMAGEBATCH_MODELS (see "
                    "configs/models.toml); to refuse unknown models, use --strict-models.",
                    "warning",
                )
            )
        return out

    def _deployment(self, job: Job, model: ModelSpec) -> str:
        return (
            job.get("deployment")
            or self.deployments.get(model.name)
            or (self.deployments.get(model.base) if model.base else None)
            or model.name
        )

    def _value(self, job: Job, column: str) -> tuple[str, str]:
        """The cell, or the run default; the second item says where it came from for messages."""
        cell = job.get(column)
        if cell:
            return cell, ""
        default = getattr(self.defaults, column, "")
        return (str(default) if default not in (None, "") else ""), " (from the run default)"

    def _check_row(self, job: Job, errs: list[Problem], warns: list[Problem]) -> ValidJob | None:
        """The row's request, resolved, or None with `errs` saying why; checks run in column order."""
        row = job.row
        operation = self._operation(job, errs)
        if operation is None:
            return None
        model_name, src = self._value(job, "model")
        if not model_name:
            errs.append(Problem(row, "model", "no model: set the column or a run default"))
            return None
        model = self.registry.get(model_name)
        if model is None:
            if not self.strict_models:
                self._unknown.setdefault(model_name, []).append(row)
                return self._check_unchecked(job, operation, model_name, errs, warns)
            errs.append(
                Problem(
                    row,
                    "model",
                    f"unknown model {model_name!r}{src}; known models: {', '.join(self.registry.names())} "
                    "(strict_models is on: add it to a models TOML file passed with --models, or turn "
                    "strict_models off to send it unchecked)",
                )
            )
            return None
        self._check_model_use(row, operation, model, errs, warns)
        prompt = self._prompt(job, operation, model, errs, warns)
        n = self._check_n(job, errs)

        params: dict[str, Any] = {"model": model.name}
        if operation != "variation":
            params["prompt"] = prompt

        size = self._size_and_quality(job, operation, model, params, errs)
        self._pass_through(job, operation, model, params, errs, warns)
        self._format_rules(row, model, params, errs)
        self._response_format(job, model, params, errs)
        images, mask, prep = self._row_sources(job, model, operation, size, errs)
        if errs:
            return None
        job_id = job.get("id") or ""
        return ValidJob(
            job,
            job_id,
            operation,
            model,
            n,
            params,
            images,
            mask,
            self._deployment(job, model),
            prep,
        )

    def _operation(self, job: Job, errs: list[Problem]) -> str | None:
        row = job.row
        operation, src = self._value(job, "operation")
        operation = operation.lower()
        if operation not in OPERATIONS:
            errs.append(
                Problem(
                    row,
                    "operation",
                    f"unknown operation {operation!r}{src}; use one of {', '.join(OPERATIONS)}",
                )
            )
            return None
        return operation

    def _check_model_use(
        self,
        row: int,
        operation: str,
        model: ModelSpec,
        errs: list[Problem],
        warns: list[Problem],
    ) -> None:
        """The model serves the operation and is not retired (a warning when it soon is)."""
        if operation not in model.endpoints:
            errs.append(
                Problem(
                    row,
                    "operation",
                    f"{model.name} does not serve '{operation}' (it serves {', '.join(model.endpoints)})",
                )
            )
        if model.retired is not None:
            if model.is_retired(self.today):
                msg = f"{model.name} was retired on api.openai.com on {model.retired.isoformat()}"
                if self.targets_openai:
                    errs.append(Problem(row, "model", msg + "; pick a current model"))
                else:
                    warns.append(
                        Problem(
                            row,
                            "model",
                            msg + "; the configured server may still serve it",
                            "warning",
                        )
                    )
            elif (model.retired - self.today).days <= RETIREMENT_WARNING_DAYS:
                warns.append(
                    Problem(
                        row,
                        "model",
                        f"{model.name} retires on api.openai.com on {model.retired.isoformat()}",
                        "warning",
                    )
                )

    def _prompt(
        self,
        job: Job,
        operation: str,
        model: ModelSpec,
        errs: list[Problem],
        warns: list[Problem],
    ) -> str:
        row = job.row
        prompt = job.get("prompt")
        if operation == "variation":
            if prompt:
                warns.append(
                    Problem(
                        row,
                        "prompt",
                        "variations take no prompt; it is recorded but not sent",
                        "warning",
                    )
                )
        elif not prompt:
            errs.append(Problem(row, "prompt", "prompt is empty"))
        elif len(prompt) > model.prompt_max:
            errs.append(
                Problem(
                    row,
                    "prompt",
                    f"prompt has {len(prompt)} characters; {model.name} allows at most {model.prompt_max}",
                )
            )
        return prompt

    def _size_and_quality(
        self,
        job: Job,
        operation: str,
        model: ModelSpec,
        params: dict[str, Any],
        errs: list[Problem],
    ) -> str:
        """Size and quality into `params` (defaults from the run, then the model); returns size."""
        row = job.row
        size, src = self._value(job, "size")
        size = size.lower() or model.default_size
        why = model.size_error(size, operation)
        if why:
            errs.append(Problem(row, "size", why + src))
        params["size"] = size

        if operation != "variation" and model.qualities:
            quality, src = self._value(job, "quality")
            quality = quality.lower() or model.default_quality
            if quality not in model.qualities:
                errs.append(
                    Problem(
                        row,
                        "quality",
                        f"{model.name} offers quality {', '.join(model.qualities)}; got {quality!r}{src}",
                    )
                )
            params["quality"] = quality
        elif job.get("quality"):
            errs.append(Problem(row, "quality", f"{model.name} takes no quality for {operation}"))
        return size

    def _pass_through(
        self,
        job: Job,
        operation: str,
        model: ModelSpec,
        params: dict[str, Any],
        errs: list[Problem],
        warns: list[Problem],
    ) -> None:
        """Optional parameters the model takes, checked against their choices into `params`."""
        row = job.row
        for column in PASS_THROUGH:
            value, src = self._value(job, column)
            if not value:
                continue
            if column not in model.params:
                if src:  # a run default the model cannot take is simply not sent
                    continue
                errs.append(Problem(row, column, f"{model.name} does not accept '{column}'"))
                continue
            if column not in model.params_for(operation):
                warns.append(
                    Problem(
                        row,
                        column,
                        f"not sent: the {operation} form has no '{column}' field for {model.name} "
                        f"(list it in edit_params for the model in the registry if your server takes it)",
                        "warning",
                    )
                )
                continue
            if column == "input_fidelity" and operation != "edit":
                errs.append(Problem(row, column, "input_fidelity applies to edits only"))
                continue
            if column == "user":
                params["user"] = value
                continue
            if column == "output_compression":
                comp = _compression(row, value, src, errs)
                if comp is not None:
                    params[column] = comp
                continue
            value = value.lower()
            if column == "output_format" and value == "jpg":
                value = "jpeg"
            if value not in CHOICES[column]:
                errs.append(
                    Problem(
                        row,
                        column,
                        f"{column} must be one of {', '.join(CHOICES[column])}, got {value!r}{src}",
                    )
                )
                continue
            params[column] = value

    @staticmethod
    def _format_rules(
        row: int, model: ModelSpec, params: dict[str, Any], errs: list[Problem]
    ) -> None:
        """Compression and transparency need a format that has them."""
        fmt = params.get("output_format", "png")
        if "output_compression" in params and fmt not in ("jpeg", "webp"):
            errs.append(
                Problem(
                    row,
                    "output_compression",
                    "output_compression applies only with output_format jpeg or webp",
                )
            )
        if params.get("background") == "transparent":
            if fmt not in ("png", "webp"):
                errs.append(
                    Problem(
                        row,
                        "background",
                        "a transparent background needs output_format png or webp",
                    )
                )
            elif not model.transparent_background:
                errs.append(
                    Problem(
                        row,
                        "background",
                        f"transparent backgrounds are not confirmed for {model.name}; set transparent_background = true for it in the model registry to try",
                    )
                )

    @staticmethod
    def _response_format(
        job: Job, model: ModelSpec, params: dict[str, Any], errs: list[Problem]
    ) -> None:
        row = job.row
        if "response_format" in model.params:
            rf = job.get("response_format").lower() or "b64_json"
            if rf not in CHOICES["response_format"]:
                errs.append(
                    Problem(
                        row,
                        "response_format",
                        f"response_format must be url or b64_json, got {rf!r}",
                    )
                )
            params["response_format"] = rf
        elif job.get("response_format"):
            errs.append(
                Problem(
                    row,
                    "response_format",
                    f"{model.name} does not accept 'response_format' (it always returns base64)",
                )
            )

    def _row_sources(
        self, job: Job, model: ModelSpec, operation: str, size: str, errs: list[Problem]
    ) -> tuple[list[SourceImage], SourceImage | None, PrepOptions | None]:
        """Source images and mask for edits and variations; other rows must not name any."""
        if operation in ("edit", "variation"):
            return self._check_sources(job, model, operation, size, errs)
        for column in ("image", "mask", "fit"):
            if job.get(column):
                errs.append(
                    Problem(
                        job.row,
                        column,
                        f"'{column}' is only used by edit and variation rows; set operation",
                    )
                )
        return [], None, None

    def _check_n(self, job: Job, errs: list[Problem]) -> int:
        n_text, src = self._value(job, "n")
        parsed = whole_number(n_text) if n_text else 1
        if parsed is None:
            errs.append(
                Problem(
                    job.row, "n", f"n must be a whole number in digits 0-9, got {n_text!r}{src}"
                )
            )
            return 1
        n = parsed
        if n < 1:
            errs.append(Problem(job.row, "n", f"n must be at least 1, got {n}{src}"))
        elif n > self.defaults.max_n_per_job:
            errs.append(
                Problem(
                    job.row,
                    "n",
                    f"n is {n}; at most {self.defaults.max_n_per_job} images per job (max_n_per_job){src}",
                )
            )
        return n

    def _check_unchecked(
        self, job: Job, operation: str, name: str, errs: list[Problem], warns: list[Problem]
    ) -> ValidJob | None:
        """A model the registry does not know: only what needs no model knowledge is checked,
        and every value the row (or a run default) gives is sent as it is."""
        row = job.row
        model = unchecked(name)
        params: dict[str, Any] = {"model": name}
        prompt = job.get("prompt")
        if operation != "variation":
            if not prompt:
                errs.append(Problem(row, "prompt", "prompt is empty"))
            params["prompt"] = prompt
        n = self._check_n(job, errs)
        for column in ("size", "quality", *PASS_THROUGH, "response_format"):
            value, src = self._value(job, column)
            if not value:
                continue
            if column == "output_compression":
                comp = _compression(row, value, src, errs)
                if comp is not None:
                    params[column] = comp
            else:
                params[column] = value
        images: list[SourceImage] = []
        mask: SourceImage | None = None
        if operation in ("edit", "variation"):
            raw = [p.strip() for p in job.get("image").split(IMAGE_SEPARATOR) if p.strip()]
            if not raw:
                errs.append(Problem(row, "image", f"{operation} needs a source image"))
            for item in raw:
                src_image = self._source(item, "image", row, errs)
                if src_image is not None:
                    images.append(src_image)
            if job.get("mask"):
                mask = self._source(job.get("mask"), "mask", row, errs)
        else:
            for column in ("image", "mask"):
                if job.get(column):
                    errs.append(
                        Problem(
                            row,
                            column,
                            f"'{column}' is only used by edit and variation rows; set operation",
                        )
                    )
        if errs:
            return None
        return ValidJob(
            job,
            job.get("id") or "",
            operation,
            model,
            n,
            params,
            images,
            mask,
            self._deployment(job, model),
        )

    def _source(self, raw: str, column: str, row: int, errs: list[Problem]) -> SourceImage | None:
        """Resolve and fully decode one source file (once per file per check)."""
        inputs = self.inputs
        root = Path(inputs.sources_root).expanduser().resolve() if inputs.sources_root else None
        try:
            path = resolve_source(raw, self.base_dir, root, inputs.allow_outside_sources)
        except SourceError as exc:
            errs.append(Problem(row, column, str(exc)))
            return None
        found = self._inspected.get(path)
        if found is None:
            try:
                found = inspect_source(path, inputs.max_source_pixels)
            except SourceError as exc:
                found = exc
            self._inspected[path] = found
        if isinstance(found, SourceError):
            errs.append(Problem(row, column, str(found)))
            return None
        return found

    def _prep_options(
        self, job: Job, model: ModelSpec, operation: str, size: str, errs: list[Problem]
    ) -> PrepOptions:
        """The row's preparation settings; those that cannot change the bytes sent are blank,
        so they stay out of the image key."""
        rules = input_rules(model, operation)
        cell = job.get("fit").lower()
        fit = cell or self.inputs.fit or ("pad" if operation == "edit" else "crop")
        src = "" if cell else " (from [inputs] fit)" if self.inputs.fit else ""
        if fit not in FITS:
            errs.append(
                Problem(job.row, "fit", f"fit must be crop, pad or error, got {fit!r}{src}")
            )
        pad = self.inputs.pad_color
        try:
            check_pad_color(pad)
        except SourceError as exc:
            errs.append(Problem(job.row, "fit", f"{exc} ([inputs] pad_color)"))
        if operation == "variation" and fit == "pad" and pad.lower() == "transparent":
            errs.append(
                Problem(
                    job.row,
                    "fit",
                    "transparent padding means nothing to a variation; pad with a colour or crop",
                )
            )
        if not rules.square:
            fit, pad = "", ""
        repaint = self.inputs.mask_repaint if job.get("mask") else ""
        return PrepOptions(fit, pad, repaint, size if rules.resize_to_size else "")

    def _check_sources(
        self, job: Job, model: ModelSpec, operation: str, size: str, errs: list[Problem]
    ) -> tuple[list[SourceImage], SourceImage | None, PrepOptions]:
        row = job.row
        prep = self._prep_options(job, model, operation, size, errs)
        raw = [p.strip() for p in job.get("image").split(IMAGE_SEPARATOR) if p.strip()]
        if not raw:
            errs.append(Problem(row, "image", f"{operation} needs a source image"))
            return [], None, prep
        limit = input_rules(model, operation).max_images
        if len(raw) > limit:
            errs.append(
                Problem(
                    row,
                    "image",
                    f"{model.name} takes at most {limit} source image(s) for {operation}; got {len(raw)}",
                )
            )
        images = []
        for item in raw:
            src = self._source(item, "image", row, errs)
            if src is None:
                continue
            images.append(src)
            width, height = src.display_size
            if prep.fit == "error" and width != height:
                errs.append(
                    Problem(
                        row,
                        "image",
                        f"{src.path.name} is {width}x{height}; {model.name} {operation} needs a square image and fit is 'error' (use crop or pad)",
                    )
                )
        mask = None
        if job.get("mask"):
            if operation != "edit":
                errs.append(Problem(row, "mask", "a mask is only used by edits"))
            else:
                mask = self._source(job.get("mask"), "mask", row, errs)
                if mask is not None and images:
                    try:
                        check_mask_shape(mask, images[0])
                    except SourceError as exc:
                        errs.append(Problem(row, "mask", str(exc)))
        return images, mask, prep


def _compression(row: int, value: str, src: str, errs: list[Problem]) -> int | None:
    """output_compression as a whole number from 0 to 100, or None with a problem recorded."""
    comp = whole_number(value)
    if comp is None or not 0 <= comp <= 100:
        errs.append(
            Problem(
                row,
                "output_compression",
                f"output_compression must be a whole number from 0 to 100, got {value!r}{src}",
            )
        )
        return None
    return comp
