"""Offline conversion: bit-exact round trips, sharded files, dropped training state, and bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowrl_megatron.conversion.convert import hf_to_megatron, megatron_to_hf
from flowrl_megatron.conversion.dist_ckpt import DistCheckpointReader, TensorChunk, extra_state_bytes, save_streaming
from flowrl_megatron.conversion.hf_io import HFReader
from flowrl_megatron.models.tiny import make_tiny_model
from tests.distributed import REPO


def hf_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    reader = HFReader(model_dir)
    return {name: reader.get(name) for name in reader.weight_map}


def assert_bit_exact(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize(
    ("fixture", "tp", "pp"),
    [("tiny_untied", 2, 2), ("tiny_tied", 2, 2), ("tiny_llama", 2, 2), ("tiny_qwen3", 2, 2), ("tiny_qwen3", 1, 4),
     ("tiny_qwen3", 2, 1)],
)
def test_round_trip_is_bit_exact(fixture, tp, pp, request, tmp_path):
    src = request.getfixturevalue(fixture)
    ckpt = hf_to_megatron(src, tmp_path / "ckpt", tp=tp, pp=pp)
    out = megatron_to_hf(ckpt, tmp_path / "hf")
    assert_bit_exact(hf_tensors(src), hf_tensors(out))
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    assert ("lm_head.weight" in HFReader(out)) == (fixture not in ("tiny_tied", "tiny_qwen3"))
    assert not list(tmp_path.glob(".*partial*"))


def test_bfloat16_source_keeps_its_dtype(tmp_path):
    src = make_tiny_model(tmp_path / "bf16", dtype=torch.bfloat16, num_hidden_layers=2)
    out = megatron_to_hf(hf_to_megatron(src, tmp_path / "ckpt", tp=2), tmp_path / "hf")
    tensors = hf_tensors(out)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert_bit_exact(hf_tensors(src), tensors)


def test_sharded_input_and_output_load_in_transformers(tiny_untied, tmp_path):
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(str(tiny_untied), dtype=torch.float32)
    sharded_src = tmp_path / "sharded_src"
    original.save_pretrained(str(sharded_src), max_shard_size="1MB")
    shutil.copy(tiny_untied / "tokenizer.json", sharded_src)
    assert (sharded_src / "model.safetensors.index.json").exists()

    ckpt = hf_to_megatron(sharded_src, tmp_path / "ckpt", tp=1, pp=2)
    out = megatron_to_hf(ckpt, tmp_path / "hf", max_shard_bytes=1024**2)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and all((out / f).is_file() for f in files)
    assert_bit_exact(hf_tensors(tiny_untied), hf_tensors(out))

    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    tokens = torch.tensor([[1, 2, 3, 400, 5]])
    with torch.no_grad():
        assert torch.equal(original(tokens).logits, reloaded(tokens).logits)


def test_z_head_and_optimizer_state_are_not_exported(tiny_untied, tmp_path):
    """A training checkpoint holds more than the model; only the mapped weights reach the HF export."""
    ckpt = hf_to_megatron(tiny_untied, tmp_path / "ckpt", tp=1, pp=1)
    reader = DistCheckpointReader(ckpt)
    chunks = []
    for key, shape in {k: reader.shape(k) for k in reader.tensors}.items():
        full = reader.read([(key, (0,) * len(shape), shape)])[key]
        chunks.append(TensorChunk(key, (0,) * len(shape), shape, shape, full.dtype, lambda full=full: full))
    for key in ("z_head.layers.0.weight", "optimizer.state.exp_avg.decoder.final_layernorm.weight"):
        chunks.append(TensorChunk(key, (0, 0), (8, 8), (8, 8), torch.float32, lambda: torch.ones(8, 8)))
    training = tmp_path / "training"
    training.mkdir()
    save_streaming(training, chunks, {"decoder.layers.mlp.linear_fc1._extra_state/shard_0_4": extra_state_bytes()})
    out = megatron_to_hf(training, tmp_path / "hf", hf_config_dir=tiny_untied)
    assert_bit_exact(hf_tensors(tiny_untied), hf_tensors(out))


def run_tool(tool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"checkpoints_tools.{tool}", *args],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )


def assert_clean_failure(result: subprocess.CompletedProcess, message: str, output: Path) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not output.exists() or not any(output.iterdir())
    assert not list(output.parent.glob(f".{output.name}.partial*"))


@pytest.fixture()
def broken_copy(tiny_untied, tmp_path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(tiny_untied, dst)
    return dst


@pytest.mark.parametrize(
    ("breakage", "args", "message"),
    [
        ("unknown_arch", [], "architecture 'GPT2LMHeadModel' is not supported"),
        (None, ["--tp", "3"], "TP=3 does not divide the 4 attention heads"),
        (None, ["--tp", "4"], "TP=4 does not divide the 2 key/value heads"),
        (None, ["--pp", "3"], "PP=3 does not divide the 4 layers"),
        ("missing_weights", [], "no model.safetensors or model.safetensors.index.json"),
        ("corrupt_weights", [], "is not a readable safetensors file"),
        ("truncated_weights", [], "is not a readable safetensors file"),
        ("missing_tensor", [], "tensor 'model.layers.3.mlp.down_proj.weight' is missing"),
        ("wrong_config", [], "has shape (32, 128) but config.json implies (64, 128)"),
    ],
)
def test_hf_to_megatron_rejects_bad_input(broken_copy, tmp_path, breakage, args, message):
    weights = broken_copy / "model.safetensors"
    if breakage == "unknown_arch":
        cfg = json.loads((broken_copy / "config.json").read_text())
        (broken_copy / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    elif breakage == "missing_weights":
        weights.unlink()
    elif breakage == "corrupt_weights":
        weights.write_bytes(b"\x00" * 4096)
    elif breakage == "truncated_weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif breakage in ("missing_tensor", "wrong_config"):
        from safetensors.torch import save_file

        tensors = load_file(weights)
        if breakage == "missing_tensor":
            del tensors["model.layers.3.mlp.down_proj.weight"]
        else:
            tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(32, 128)
        save_file(tensors, weights)
    output = tmp_path / "out"
    assert_clean_failure(run_tool("hf_to_megatron", "--input", str(broken_copy), "--output", str(output), *args),
                         message, output)


def test_non_empty_output_is_refused_and_left_untouched(tiny_untied, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("precious")
    result = run_tool("hf_to_megatron", "--input", str(tiny_untied), "--output", str(output))
    assert result.returncode == 2 and "already exists and is not empty" in result.stderr
    assert [p.name for p in output.iterdir()] == ["keep.txt"]


def test_megatron_to_hf_rejects_bad_input(tiny_untied, tmp_path):
    output = tmp_path / "out"
    result = run_tool("megatron_to_hf", "--input", str(tiny_untied), "--output", str(output))
    assert_clean_failure(result, "metadata.json not found", output)

    ckpt = hf_to_megatron(tiny_untied, tmp_path / "ckpt")
    (ckpt / ".metadata").write_bytes(b"not a pickle")
    assert_clean_failure(run_tool("megatron_to_hf", "--input", str(ckpt), "--output", str(output)),
                         "the checkpoint is incomplete or corrupt", output)

    other = make_tiny_model(tmp_path / "other", num_hidden_layers=2)
    ckpt2 = hf_to_megatron(tiny_untied, tmp_path / "ckpt2")
    result = run_tool("megatron_to_hf", "--input", str(ckpt2), "--output", str(output), "--hf-config", str(other))
    assert_clean_failure(result, "the checkpoint and config are from different models", output)


def test_cli_success_and_help(tiny_tied, tmp_path):
    result = run_tool("hf_to_megatron", "--input", str(tiny_tied), "--output", str(tmp_path / "c"), "--tp", "2")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "c" / "flowrl_checkpoint.json").read_text())["tp"] == 2
    assert run_tool("megatron_to_hf", "--input", str(tmp_path / "c"), "--output", str(tmp_path / "h")).returncode == 0
    assert_bit_exact(hf_tensors(tiny_tied), hf_tensors(tmp_path / "h"))
    assert "--tp" in run_tool("hf_to_megatron", "--help").stdout
    assert "Z head" in run_tool("megatron_to_hf", "--help").stdout
