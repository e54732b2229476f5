"""The tests' SeaweedFS: bench/seaweed.py (the benchmarks start the same cluster)."""

from bench.seaweed import ADMIN_KEY, READER_KEY, Seaweed, weed_binary

__all__ = ["ADMIN_KEY", "READER_KEY", "Seaweed", "weed_binary"]
