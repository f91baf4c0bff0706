"""sage_nb benchmarks: `python -m benchmarks.run` (see README.md)."""
