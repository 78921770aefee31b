"""What ``flowrl train`` checks on the driver before any rank starts: the files and code a run will read.

``config.validate`` checks settings against each other; this reads what they point at (every data row, the
weights' headers, the user's reward function called once, the tracking backends), so a bad input is one sentence
within seconds instead of a rank's traceback after a minute of start-up. Nothing here imports torch, megatron-core
or vLLM.
"""

from __future__ import annotations

import dataclasses

from flowrl_megatron.config import RunConfig


def check_inputs(cfg: RunConfig) -> None:
    from flowrl_megatron.conversion.hf_io import HFReader
    from flowrl_megatron.data.prompts import read_rows
    from flowrl_megatron.rewards import check_reward_call
    from flowrl_megatron.tracking import check_backends

    if not cfg.model.megatron_checkpoint:  # the weights the run converts at start (and engines serve)
        HFReader(cfg.model.path)
    rows = read_rows(cfg.data)
    _, _, _, answer = next(rows)  # validate() made sure there are files; an empty one raises
    for _ in rows:
        pass
    if cfg.eval.every:
        for _ in read_rows(dataclasses.replace(cfg.data, train_files=list(cfg.eval.files))):
            pass
    check_reward_call(cfg.reward.name, answer)
    check_backends(cfg)
