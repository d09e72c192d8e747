"""Training: the loop, how the model is parallelised, checkpoints, step health and throughput."""
