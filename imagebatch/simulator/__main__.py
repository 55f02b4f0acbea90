"""`python -m imagebatch.simulator --port 8000 [--latency uniform:0.5,2] [--ipm 50] ...`

Prints "imagebatch simulator listening on http://HOST:PORT/v1" once it accepts connections
(useful with --port 0), then serves until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from imagebatch.configs.registry import Registry

from .config import SimConfig
from .server import serve_forever

# flag -> SimConfig field
_FLAGS: list[tuple[str, str, type, str]] = [
    (
        "--latency",
        "latency",
        str,
        "SECONDS, fixed:S, uniform:MIN,MAX or longtail:MEDIAN,CAP[,SIGMA]",
    ),
    ("--latency-per-image", "latency_per_image", float, "extra seconds per image after the first"),
    ("--seed", "seed", int, "seed for latency and fault draws"),
    ("--rpm", "rpm", int, "requests per window (0 = unlimited)"),
    ("--ipm", "ipm", int, "images per window (0 = unlimited)"),
    ("--window", "window_seconds", float, "rate-limit window in seconds (default 60)"),
    ("--quota", "quota_images", int, "images billed before 429 insufficient_quota (0 = unlimited)"),
    (
        "--moderation-word",
        "moderation_word",
        str,
        "prompts containing it are refused ('' disables)",
    ),
    ("--error-rate", "error_rate", float, "share of requests answered 500/503"),
    ("--overload-status", "overload_status", int, "injected overloads answer 503 or 429"),
    ("--stall-rate", "stall_rate", float, "share of requests stalled for --stall-seconds"),
    ("--stall-seconds", "stall_seconds", float, "length of a stall"),
    ("--drop-rate", "drop_rate", float, "share of requests billed then dropped"),
    (
        "--malformed-rate",
        "malformed_rate",
        float,
        "share of requests billed then answered with a broken body",
    ),
    ("--url-ttl", "url_ttl", float, "seconds a DALL-E image URL stays valid"),
    ("--api-key", "api_key", str, "only accept this key (default: any)"),
    ("--organization", "organization", str, "organization named in rate-limit messages"),
    ("--cache-size", "cache_size", int, "encoded images kept in the render cache"),
    (
        "--omit-retry-after-rate",
        "omit_retry_after_rate",
        float,
        "share of rate-limit 429s sent without retry-after (the message keeps the wait)",
    ),
    (
        "--error-style",
        "error_style",
        str,
        "error bodies as openai sends them, as a litellm proxy rewrites them, or as fastapi validates",
    ),
    (
        "--reset-format",
        "reset_format",
        str,
        "x-ratelimit-reset-* as Go durations (duration) or absolute Unix times (unix)",
    ),
    (
        "--quota-error",
        "quota_error",
        str,
        "what an exhausted --quota answers: insufficient_quota or billing_hard_limit_reached",
    ),
]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m imagebatch.simulator", description="OpenAI-compatible Images API simulator"
    )
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    for flag, dest, typ, help_ in _FLAGS:
        ap.add_argument(flag, dest=dest, type=typ, default=None, help=help_)
    ap.add_argument(
        "--refuse-retired",
        action="store_true",
        default=None,
        help="404 for models past their retired date",
    )
    ap.add_argument(
        "--bill-on-disconnect",
        action="store_true",
        default=None,
        help="bill requests whose client went away",
    )
    ap.add_argument(
        "--no-ratelimit-headers",
        dest="ratelimit_headers",
        action="store_false",
        default=None,
        help="send no x-ratelimit-* headers: the limits show only as 429s",
    )
    ap.add_argument(
        "--no-text",
        dest="render_text",
        action="store_false",
        default=None,
        help="don't draw the prompt",
    )
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any SimConfig knob"
    )
    ap.add_argument(
        "--models", action="append", default=[], metavar="TOML", help="extra model registry file(s)"
    )
    ap.add_argument("--log-level", default="warning")
    return ap


def config_from_args(args: argparse.Namespace) -> SimConfig:
    knobs = {}
    for _, dest, _, _ in _FLAGS:
        if getattr(args, dest) is not None:
            knobs[dest] = getattr(args, dest)
    for dest in ("refuse_retired", "bill_on_disconnect", "ratelimit_headers", "render_text"):
        if getattr(args, dest) is not None:
            knobs[dest] = getattr(args, dest)
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        knobs[key.strip()] = value
    return SimConfig.from_dict(knobs)


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        config = config_from_args(args)
        registry = Registry.load(*args.models)
    except Exception as exc:
        ap.error(str(exc))
    try:
        serve_forever(config, args.host, args.port, registry=registry, log_level=args.log_level)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
