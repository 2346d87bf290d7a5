"""Training engine: optimizer, state, partitioning, checkpoints, metric writers, the loop."""
