"""Training-side plumbing: DDP and optimizer set-up, and passes through megatron-core's schedule."""
