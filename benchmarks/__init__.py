"""Benchmarks, each runnable as ``python -m benchmarks.bench_<name>`` (results in ``results/``)."""
