"""``mergeserve bench-serve``: the serving benchmarks (peers, load generators, process accounting)."""
