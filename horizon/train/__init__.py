"""Training: optimizer, pure train/eval steps, sharding, checkpoints, metrics and the loop."""
