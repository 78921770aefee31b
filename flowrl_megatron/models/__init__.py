"""Model architecture description and Megatron model builders."""
