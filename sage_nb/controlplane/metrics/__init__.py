"""What the engines are doing over time: each ready engine's own ``/metrics`` read every few seconds
(:mod:`.scrape`, one table of vLLM's names across versions in :mod:`.names`), kept as a bounded
history and turned into series people read (:mod:`.history`), by one collector per control plane
(:mod:`.collector`)."""
