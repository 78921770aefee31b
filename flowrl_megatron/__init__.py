"""FlowRL post-training on Megatron-core with vLLM rollouts."""

import warnings

__version__ = "0.1.0"

# Warnings megatron-core gives about itself, which a user cannot act on, printed above our own messages otherwise.
# Only these messages, only from megatron-core (and torch, for the deprecated API megatron-core calls):
# - at import, once per module: transformer-engine or apex is missing, it falls back to its local implementations
#   (true on every CPU machine; model.attention and docs/training.md say what the GPU path uses);
# - its TransformerConfig's own default cuda_graph_scope is the deprecated "full";
# - its distributed checkpointing calls torch APIs torch has deprecated (load_state_dict, ShardedTensor).
for message, category, module in (
    (r"(Transformer Engine and )?Apex (is|are) not installed", UserWarning, r"megatron\.core"),
    (r"full scope is deprecated", UserWarning, r"megatron\.core\.transformer"),
    (r"`load_state_dict` is deprecated", FutureWarning, r"megatron\.core\.dist_checkpointing"),
    (r"Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning, r""),
):
    warnings.filterwarnings("ignore", message=message, category=category, module=module)
