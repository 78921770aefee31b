"""FlowRL post-training on Megatron-core with vLLM rollouts."""

__version__ = "0.1.0"
