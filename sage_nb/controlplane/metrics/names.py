"""The one table of vLLM's metric names sage_nb reads, newest name first.

vLLM renames metrics now and then (a name deprecated in X.Y is hidden in X.Y+1 and removed in X.Y+2),
and every reader that hard-codes one name breaks on the next release. Each quantity sage_nb shows has
one key here and the names vLLM has used for it; :mod:`.scrape` takes the first name an engine serves.
Counters are listed without ``_total`` (the parser strips it from a family's name).
"""

from __future__ import annotations

GAUGES: dict[str, tuple[str, ...]] = {
    "running": ("vllm:num_requests_running",),
    "waiting": ("vllm:num_requests_waiting",),
    # 0..1; "gpu_" was dropped in 0.9 (the CPU backend has one too) and removed in 0.12
    "kv_cache": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
}
COUNTERS: dict[str, tuple[str, ...]] = {
    "prompt_tokens": ("vllm:prompt_tokens",),
    "generation_tokens": ("vllm:generation_tokens",),
    "prefix_queries": ("vllm:prefix_cache_queries", "vllm:gpu_prefix_cache_queries"),
    "prefix_hits": ("vllm:prefix_cache_hits", "vllm:gpu_prefix_cache_hits"),
    "preemptions": ("vllm:num_preemptions",),
}
BY_LABEL: dict[str, tuple[tuple[str, ...], str]] = {  # key -> (names, the label that splits it)
    "finished": (("vllm:request_success",), "finished_reason"),
    "sleep_state": (("vllm:engine_sleep_state",), "sleep_state"),
}
HISTOGRAMS: dict[str, tuple[str, ...]] = {
    "ttft": ("vllm:time_to_first_token_seconds",),
    # per-token latency: renamed in 0.11 (hidden in 0.12, then removed)
    "itl": ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"),
}  # end-to-end and queue-time histograms are not read: each is ~40 lines of a page's parse for a figure
#    nobody shows (a page's parse is most of what collection costs the server)


def wanted() -> frozenset[str]:
    """Every family name in the table (what the scraper keeps of a page)."""
    names = [n for table in (GAUGES, COUNTERS, HISTOGRAMS) for group in table.values() for n in group]
    names += [n for group, _ in BY_LABEL.values() for n in group]
    return frozenset(names)
