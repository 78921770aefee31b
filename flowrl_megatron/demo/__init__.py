"""``flowrl demo``: FlowRL against GRPO on a tiny model, on CPU, with every real part of a production run."""
