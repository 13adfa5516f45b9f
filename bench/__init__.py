"""capsock benchmarks (run with ``python -m bench.throughput``)."""
