"""Rollout: vLLM engine processes and their key, the generation client, weight sync, the asynchronous producer."""
