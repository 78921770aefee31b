"""Command-line wrappers over ``flowrl_megatron.conversion``."""
