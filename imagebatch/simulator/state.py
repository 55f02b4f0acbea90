"""Simulator state: statistics, the files behind DALL·E-style URLs, limits, quota, render cache."""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import time
from collections import Counter, OrderedDict
from typing import Any

from imagebatch.configs.registry import Registry

from .config import SimConfig
from .limits import Quota, RateLimits
from .render import RenderCache

HOLD_SECONDS = 60.0  # hold_until_in_flight gives up after this long
URL_GRACE = 300.0  # expired URL tokens answer 410 for this long, then 404


class Stats:
    def __init__(self) -> None:
        self.started = time.time()
        self.requests_seen = 0
        self.requests_ok = 0
        self.images_billed = 0
        self.requests_billed = 0  # requests that billed their images (answered, dropped, cut off)
        self.status: Counter[str] = Counter()
        self.rate_limited = 0
        self.quota_exceeded = 0
        self.moderated = 0
        self.faults: Counter[str] = Counter()
        self.client_disconnects = 0
        self.in_flight = 0
        self.peak_in_flight = 0
        self.per_model: dict[str, Counter[str]] = {}
        self.per_endpoint: Counter[str] = Counter()
        self.azure_deployments: Counter[str] = Counter()  # requests per Azure deployment path
        self.files_served = 0

    def model(self, name: str) -> Counter[str]:
        if name not in self.per_model:
            self.per_model[name] = Counter(requests=0, ok=0, images=0)
        return self.per_model[name]

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests_seen": self.requests_seen,
            "requests_ok": self.requests_ok,
            "images_billed": self.images_billed,
            "requests_billed": self.requests_billed,
            "status": dict(sorted(self.status.items())),
            "rate_limited": self.rate_limited,
            "quota_exceeded": self.quota_exceeded,
            "moderated": self.moderated,
            "faults": {k: self.faults.get(k, 0) for k in ("error", "stall", "drop", "malformed")},
            "client_disconnects": self.client_disconnects,
            "in_flight": self.in_flight,
            "peak_in_flight": self.peak_in_flight,
            "per_model": {m: dict(c) for m, c in sorted(self.per_model.items())},
            "per_endpoint": dict(self.per_endpoint),
            "azure_deployments": dict(self.azure_deployments),
            "files_served": self.files_served,
            "uptime_seconds": round(time.time() - self.started, 3),
        }


class FileStore:
    """Images behind DALL·E-style URLs: token -> (bytes, content type, expiry)."""

    MAX_ITEMS = 50_000

    def __init__(self) -> None:
        self._items: OrderedDict[str, tuple[bytes, str, float]] = OrderedDict()

    def put(self, data: bytes, content_type: str, ttl: float, now: float) -> str:
        self.purge(now)
        token = secrets.token_urlsafe(24)
        self._items[token] = (data, content_type, now + ttl)
        while len(self._items) > self.MAX_ITEMS:
            self._items.popitem(last=False)
        return token

    def get(self, token: str, now: float) -> tuple[bytes, str] | str | None:
        item = self._items.get(token)
        if item is None:
            return None
        data, ctype, expires = item
        if now >= expires:
            return "expired"
        return data, ctype

    def purge(self, now: float) -> None:
        items = self._items
        while items:
            _token, (_, _, expires) = next(iter(items.items()))
            if expires + URL_GRACE > now:
                break
            items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()


MAX_KEYS = 100_000


class SimState:
    def __init__(self, config: SimConfig, registry: Registry) -> None:
        self.config = config
        self.registry = registry
        self.limits = RateLimits()
        self.quota = Quota()
        self.stats = Stats()
        self.files = FileStore()
        self.cache = RenderCache(config.cache_size)
        self.rng = random.Random(config.seed)
        self._seed = config.seed
        self._held: asyncio.Event | None = None
        # images rendered so far per render key: the next call for the same job continues
        # the count, so its images differ from the earlier ones (as real images do)
        self._rendered: dict[str, int] = {}

    async def hold(self, until: int, in_flight: int) -> None:
        """Keep this request until `until` requests are in flight at once (then release all,
        and hold nothing more until a reset); gives up after HOLD_SECONDS."""
        if self._held is None:
            self._held = asyncio.Event()
        if self._held.is_set():
            return
        if in_flight >= until:
            self._held.set()
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._held.wait(), HOLD_SECONDS)

    def image_indices(self, key: str, n: int) -> range:
        """Render indices for the next `n` images of `key` (distinct from earlier calls)."""
        start = self._rendered.get(key, 0)
        if len(self._rendered) >= MAX_KEYS and key not in self._rendered:
            self._rendered.clear()  # bounded memory on endless benchmark runs
        self._rendered[key] = start + n
        return range(start, start + n)

    def sync(self) -> None:
        """Pick up config changes made directly on the dataclass."""
        if self.config.seed != self._seed:
            self._seed = self.config.seed
            self.rng.seed(self._seed)
        self.cache.maxsize = self.config.cache_size

    def reset(self) -> None:
        self._rendered.clear()
        self.limits.clear()
        self.quota.clear()
        self.stats = Stats()
        self._seed = self.config.seed
        self.rng.seed(self._seed)
        self._held = None
