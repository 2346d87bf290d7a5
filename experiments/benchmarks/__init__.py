"""Training-throughput benchmarks: `python -m experiments.benchmarks.run --help`."""
