"""Rollout: vLLM engine processes, the generation client (and, next, weight sync)."""
