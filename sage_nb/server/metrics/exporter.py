"""sage_nb's own metrics in the Prometheus text format, for the lab's Prometheus and Grafana.

The gateway counts its requests in plain dicts (:class:`GatewayStats`, a dict update per request) and
everything is turned into metric families only when Prometheus scrapes (:class:`SageCollector`, a
``prometheus_client`` custom collector in a registry of the server's own): the data path pays nothing
for an exporter nobody reads. Names follow Prometheus' conventions (``sage_nb_`` prefix, base units,
``_total`` counters, ``_seconds``, ``_bytes``).
"""

from __future__ import annotations

import bisect
from collections import defaultdict

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import CollectorRegistry

from sage_nb.controlplane.state import EngineState

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, float("inf"))
MIB = 1024 * 1024


class GatewayStats:
    """What the gateway did: requests by engine and status, their durations, wakes and refused starts."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)  # (engine, route, status) -> n
        self.durations: dict[str, list[float]] = {}  # engine -> [counts per bucket..., sum]
        self.refusals: dict[int, int] = defaultdict(int)  # HTTP status of a refused start -> n

    def observe(self, engine: str, route: str, status: int, seconds: float) -> None:
        self.requests[(engine, route, status)] += 1
        counts = self.durations.get(engine)
        if counts is None:
            counts = self.durations[engine] = [0.0] * (len(BUCKETS) + 1)
        counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        counts[-1] += seconds

    def refused(self, status: int) -> None:
        self.refusals[status] += 1


class SageCollector:
    """Builds the families at scrape time from the control plane, its metrics collector, the waker and
    the gateway's stats."""

    def __init__(self, cp, stats: GatewayStats, waker=None) -> None:
        self.cp, self.stats, self.waker = cp, stats, waker

    def collect(self):
        requests = CounterMetricFamily("sage_nb_gateway_requests", "Requests the gateway answered, by engine "
                                       "(- when none was chosen), route and HTTP status.",
                                       labels=("engine", "route", "status"))
        for (engine, route, status), n in sorted(self.stats.requests.items()):
            requests.add_metric((engine, route, str(status)), n)
        yield requests
        latency = HistogramMetricFamily("sage_nb_gateway_request_duration_seconds", "Time from a request's "
                                        "arrival to its answer's end at the gateway, by engine.", labels=("engine",))
        for engine, counts in sorted(self.stats.durations.items()):
            cumulative, running = [], 0.0
            for bound, n in zip(BUCKETS, counts, strict=False):
                running += n
                cumulative.append(("+Inf" if bound == float("inf") else repr(bound), running))
            latency.add_metric((engine,), cumulative, sum_value=counts[-1])
        yield latency
        refusals = CounterMetricFamily("sage_nb_start_refusals", "Engine starts refused, by HTTP status (409: "
                                       "no room or a cap; 400: a bad request).", labels=("status",))
        for status, n in sorted(self.stats.refusals.items()):
            refusals.add_metric((str(status),), n)
        yield refusals
        wakes = CounterMetricFamily("sage_nb_wakes", "Idle engines woken by a request to this server.")
        wakes.add_metric((), getattr(self.waker, "wakes", 0))
        yield wakes
        yield from self._engines()
        yield from self._gpus()

    def _engines(self):
        records = self.cp.registry.engines()
        states = GaugeMetricFamily("sage_nb_engines", "Engines in the registry, by state and kind.",
                                   labels=("state", "kind"))
        counts: dict[tuple[str, str], int] = defaultdict(int)
        for e in records:
            counts[(e.state, e.kind)] += 1
        for state in EngineState:
            for kind in ("llm", "embedding"):
                states.add_metric((state.value, kind), counts.get((state.value, kind), 0))
        yield states
        running = GaugeMetricFamily("sage_nb_engine_requests_running", "Requests the engine runs (its "
                                    "vllm:num_requests_running, as last collected).", labels=("engine",))
        waiting = GaugeMetricFamily("sage_nb_engine_requests_waiting", "Requests waiting in the engine.",
                                    labels=("engine",))
        kv = GaugeMetricFamily("sage_nb_engine_kv_cache_usage_ratio", "The engine's KV cache in use, 0 to 1.",
                               labels=("engine",))
        for row in self.cp.metrics.overview(60):
            for family, key, scale in ((running, "running", 1), (waiting, "waiting", 1), (kv, "kv_cache_pct", 0.01)):
                if row.get(key) is not None:
                    family.add_metric((row["name"],), row[key] * scale)
        yield from (running, waiting, kv)

    def _gpus(self):
        total = GaugeMetricFamily("sage_nb_gpu_memory_total_bytes", "Each GPU's memory.", labels=("gpu", "uuid"))
        used = GaugeMetricFamily("sage_nb_gpu_memory_used_bytes", "Each GPU's memory in use (NVML).",
                                 labels=("gpu", "uuid"))
        booked = GaugeMetricFamily("sage_nb_gpu_memory_booked_bytes", "GPU memory booked in the ledger and "
                                   "not yet in use.", labels=("gpu", "uuid"))
        for g in self.cp.gpus():
            labels = (str(g["index"]), g["uuid"])
            total.add_metric(labels, g["total_mib"] * MIB)
            used.add_metric(labels, g["used_mib"] * MIB)
            booked.add_metric(labels, g["booked_mib"] * MIB)
        yield from (total, used, booked)


def registry_for(cp, stats: GatewayStats, waker=None) -> CollectorRegistry:
    """A registry of this server's own (not prometheus_client's global one, which would mix servers)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SageCollector(cp, stats, waker))
    return registry
