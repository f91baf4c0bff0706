"""One reading of an engine's ``/metrics``: the quantities of :mod:`.names`, summed over the
engine's label sets (its data-parallel ranks), parsed with ``prometheus_client``'s parser.

A vLLM page is ~50 KB, most of it histograms sage_nb does not show and the HTTP server's own
metrics; only the families of the table are handed to the parser (lines filtered by name first),
which keeps a reading to a fraction of a millisecond of the collecting process's time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from . import names

WANTED = names.wanted()
_SAMPLES = frozenset(n + suffix for n in WANTED for suffix in ("", "_total", "_bucket", "_sum", "_count"))
_HEADERS = frozenset(n + suffix for n in WANTED for suffix in ("", "_total"))  # HELP/TYPE name counters


@dataclass
class Histogram:
    """Cumulative bucket counts by upper bound (``inf`` last), with their sum and count."""

    bounds: list[float]
    counts: list[float]
    total: float = 0.0
    count: float = 0.0


@dataclass
class Reading:
    """The engine's quantities at one moment (monotonic time ``t``); a key is absent when the engine
    serves none of its names. ``served``: which name each key was read from."""

    t: float
    gauges: dict[str, float] = field(default_factory=dict)
    counters: dict[str, float] = field(default_factory=dict)
    by_label: dict[str, dict[str, float]] = field(default_factory=dict)
    histograms: dict[str, Histogram] = field(default_factory=dict)
    served: dict[str, str] = field(default_factory=dict)


def _wanted_lines(text: str) -> str:
    keep = []
    for line in text.splitlines():
        if line.startswith("# "):
            parts = line.split(" ", 3)
            if len(parts) > 2 and parts[2] in _HEADERS:
                keep.append(line)
        elif line:
            end = line.find("{")
            if (line[:end] if end > 0 else line.split(" ", 1)[0]) in _SAMPLES:
                keep.append(line)
    return "\n".join(keep) + "\n"


def read(text: str, t: float | None = None) -> Reading:
    """The quantities of :mod:`.names` on a ``/metrics`` page; a malformed page raises ``ValueError``."""
    from prometheus_client.parser import text_string_to_metric_families  # here: a client-only install lacks it

    families = {}
    for family in text_string_to_metric_families(_wanted_lines(text)):
        families[family.name] = family
    reading = Reading(t=time.monotonic() if t is None else t)

    def first(group: tuple[str, ...]):
        return next(((n, families[n]) for n in group if n in families), (None, None))

    for key, group in names.GAUGES.items():
        name, family = first(group)
        if family is not None:
            reading.gauges[key] = sum(s.value for s in family.samples if s.name == name)
            reading.served[key] = name
    for key, group in names.COUNTERS.items():
        name, family = first(group)
        if family is not None:
            reading.counters[key] = sum(s.value for s in family.samples if s.name == name + "_total")
            reading.served[key] = name
    for key, (group, label) in names.BY_LABEL.items():
        name, family = first(group)
        if family is not None:
            split: dict[str, float] = {}
            for s in family.samples:
                if s.name in (name, name + "_total") and label in s.labels:
                    split[s.labels[label]] = split.get(s.labels[label], 0.0) + s.value
            reading.by_label[key] = split
            reading.served[key] = name
    for key, group in names.HISTOGRAMS.items():
        name, family = first(group)
        if family is not None:
            reading.histograms[key] = _histogram(name, family.samples)
            reading.served[key] = name
    return reading


def _histogram(name: str, samples) -> Histogram:
    buckets: dict[float, float] = {}
    total = count = 0.0
    for s in samples:
        if s.name == name + "_bucket":
            bound = float(s.labels["le"])
            buckets[bound] = buckets.get(bound, 0.0) + s.value
        elif s.name == name + "_sum":
            total += s.value
        elif s.name == name + "_count":
            count += s.value
    bounds = sorted(buckets)
    return Histogram(bounds=bounds, counts=[buckets[b] for b in bounds], total=total, count=count)
