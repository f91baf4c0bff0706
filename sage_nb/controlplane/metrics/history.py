"""A bounded history of one engine's readings and the series people read from it.

Each reading is kept compact (gauges, counters and histogram buckets as float arrays), at most
``horizon`` seconds of them. Rates come from counter deltas between neighbouring readings (a counter
that went down means the engine restarted: its new value is the delta); latency quantiles from the
bucket deltas over a window, interpolated within a bucket as Prometheus' ``histogram_quantile`` does.
"""

from __future__ import annotations

import math
from array import array
from collections import deque
from dataclasses import dataclass

from .scrape import Reading

GAUGES = ("running", "waiting", "kv_cache")
COUNTERS = ("prompt_tokens", "generation_tokens", "prefix_queries", "prefix_hits", "preemptions")
HISTOGRAMS = ("ttft", "itl")
NAN = float("nan")


@dataclass
class Kept:
    """One reading as the history keeps it."""

    t: float
    values: array  # GAUGES then COUNTERS (NaN: not served)
    finished: dict[str, float]
    buckets: dict[str, tuple[tuple[float, ...], array]]  # key -> (bounds, cumulative counts)


class History:
    """One engine's readings over the last ``horizon`` seconds."""

    def __init__(self, horizon: float = 900.0, interval: float = 2.0) -> None:
        self.horizon = horizon
        self.readings: deque[Kept] = deque(maxlen=max(2, int(horizon / max(interval, 0.1)) + 2))
        self._bounds: dict[str, tuple[float, ...]] = {}  # shared, so each reading keeps only counts

    def add(self, reading: Reading) -> None:
        values = array("d", [reading.gauges.get(k, NAN) for k in GAUGES]
                       + [reading.counters.get(k, NAN) for k in COUNTERS])
        buckets = {}
        for key, h in reading.histograms.items():
            bounds = tuple(h.bounds)
            if self._bounds.get(key) != bounds:
                self._bounds[key] = bounds
            buckets[key] = (self._bounds[key], array("d", h.counts))
        self.readings.append(Kept(reading.t, values, dict(reading.by_label.get("finished", {})), buckets))
        while self.readings and reading.t - self.readings[0].t > self.horizon:
            self.readings.popleft()

    def window(self, seconds: float) -> list[Kept]:
        if not self.readings:
            return []
        since = self.readings[-1].t - seconds
        return [k for k in self.readings if k.t >= since]

    def points(self, seconds: float, now: float, wall: float) -> list[dict]:
        """The series over the last ``seconds``: per reading its wall-clock time, the gauges and the
        token rates since the reading before. ``now``/``wall``: the same moment, monotonic and epoch."""
        kept = self.window(seconds)
        out = []
        for before, k in zip([None, *kept], kept, strict=False):  # each reading with the one before
            v = dict(zip(GAUGES + COUNTERS, k.values, strict=True))
            point = {"t": round(wall - (now - k.t), 3),
                     "running": _num(v["running"]), "waiting": _num(v["waiting"]),
                     "kv_cache_pct": None if math.isnan(v["kv_cache"]) else round(100 * v["kv_cache"], 2)}
            for key, name in (("prompt_tokens", "prompt_tps"), ("generation_tokens", "generation_tps")):
                point[name] = None if before is None else _rate(before, k, key)
            out.append(point)
        return out

    def summary(self, seconds: float) -> dict:
        """Over the last ``seconds``: latency quantiles (ms), prefix-cache hit rate, tokens and requests
        finished by reason (deltas; ``None`` where the engine serves no such metric or nothing happened)."""
        kept = self.window(seconds)
        out: dict = {"seconds": 0.0 if len(kept) < 2 else round(kept[-1].t - kept[0].t, 1)}
        if len(kept) < 2:
            return out
        first, last = kept[0], kept[-1]
        for key in HISTOGRAMS:
            delta = _bucket_delta(first, last, key)
            for q in (50, 95):
                value = _quantile(delta, q / 100) if delta else None
                out[f"{key}_p{q}_ms"] = None if value is None else round(value * 1000, 2)
        queries, hits = _delta(first, last, "prefix_queries"), _delta(first, last, "prefix_hits")
        out["prefix_hit_rate"] = round(hits / queries, 4) if queries and hits is not None else None
        out["prompt_tokens"] = _delta(first, last, "prompt_tokens")
        out["generation_tokens"] = _delta(first, last, "generation_tokens")
        finished = {r: last.finished[r] - first.finished.get(r, 0.0) for r in last.finished}
        out["finished"] = {r: int(n) for r, n in finished.items() if n > 0}
        return out

    def totals(self) -> dict:
        """The engine's own counters at the last reading (since it started): prompt and generation tokens,
        requests finished by reason."""
        if not self.readings:
            return {}
        last = self.readings[-1]
        v = dict(zip(GAUGES + COUNTERS, last.values, strict=True))
        return {"prompt_tokens": _num(v["prompt_tokens"]), "generation_tokens": _num(v["generation_tokens"]),
                "finished": {r: int(n) for r, n in last.finished.items() if n > 0}}

    def memory_bytes(self) -> int:
        """About what the kept readings take (arrays and their counts; shared bounds not counted)."""
        return sum(k.values.itemsize * len(k.values) + sum(c.itemsize * len(c) for _, c in k.buckets.values())
                   + 64 * (len(k.finished) + len(k.buckets) + 2) for k in self.readings)


def _num(x: float) -> float | None:
    return None if math.isnan(x) else x


def _delta(a: Kept, b: Kept, key: str) -> float | None:
    i = (GAUGES + COUNTERS).index(key)
    x, y = a.values[i], b.values[i]
    if math.isnan(y):
        return None
    if math.isnan(x) or y < x:  # restarted: counted from zero again
        return y
    return y - x


def _rate(a: Kept, b: Kept, key: str) -> float | None:
    d = _delta(a, b, key)
    return None if d is None or b.t <= a.t else round(d / (b.t - a.t), 2)


def _bucket_delta(a: Kept, b: Kept, key: str) -> list[tuple[float, float]] | None:
    if key not in b.buckets:
        return None
    bounds, counts = b.buckets[key]
    if key in a.buckets and a.buckets[key][0] == bounds and all(y >= x for x, y in zip(a.buckets[key][1], counts,
                                                                                         strict=True)):
        counts = array("d", (y - x for x, y in zip(a.buckets[key][1], counts, strict=True)))
    if not counts or counts[-1] <= 0:
        return None
    return list(zip(bounds, counts, strict=True))


def _quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """``histogram_quantile``: linear within the bucket the rank falls in; the last finite bound when it
    falls in ``+Inf``."""
    total = buckets[-1][1]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound
