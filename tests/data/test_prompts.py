"""Prompts through datasets: file types, nested fields, templates, length filter, bad rows, resumable order."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from flowrl_megatron.config import DataConfig
from flowrl_megatron.data.prompts import DAPO_PREFIX, DAPO_SUFFIX, PromptStream, load_prompts, render
from flowrl_megatron.errors import UserError

ROWS = [{"q": f"{i}+{i}=", "meta": {"gt": str(2 * i)}} for i in range(6)] + [{"q": "9" * 50, "meta": {"gt": "x"}}]


@pytest.fixture()
def tokenizer(tiny_untied):
    return AutoTokenizer.from_pretrained(tiny_untied)


def write(tmp_path, kind: str, rows=ROWS):
    import datasets

    table = datasets.Dataset.from_list(rows)
    path = tmp_path / f"train.{kind}" if kind != "dir" else tmp_path / "saved"
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "parquet":
        table.to_parquet(str(path))
    else:
        table.save_to_disk(str(path))
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "dir"])
def test_every_format_loads_the_same_prompts(tmp_path, tokenizer, kind):
    cfg = DataConfig(train_files=[str(write(tmp_path, kind))], prompt_key="q", answer_key="meta.gt", template="raw",
                     max_prompt_tokens=20)
    loaded = load_prompts(cfg, tokenizer)
    assert loaded.too_long == 1  # the 50-character prompt, counted
    assert [p.answer for p in loaded.prompts] == [str(2 * i) for i in range(6)]
    assert [p.row for p in loaded.prompts] == list(range(6))
    assert tokenizer.decode(loaded.prompts[3].token_ids) == "3+3="


def test_dapo_template_wraps_the_problem(tokenizer):
    expected = DAPO_PREFIX + "1+1=" + DAPO_SUFFIX  # this tokenizer has no chat template: the user turn as text
    assert render("1+1=", "dapo", tokenizer) == tokenizer(expected, add_special_tokens=False)["input_ids"]


def test_chat_template_is_applied_when_the_tokenizer_has_one(tokenizer):
    tokenizer.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    ids = render([{"role": "user", "content": "ab"}], "chat", tokenizer)
    assert tokenizer.decode(ids) == "<|im_start|>ab<|im_end|>"


def test_a_malformed_row_names_its_file_and_row(tmp_path, tokenizer):
    good = write(tmp_path, "jsonl")
    bad = tmp_path / "bad.jsonl"
    rows = [{"q": "1=", "meta": {"gt": "1"}}, {"q": 5, "meta": {"gt": "1"}}]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(train_files=[str(good), str(bad)], prompt_key="q", answer_key="meta.gt", template="raw")
    with pytest.raises(UserError, match=rf"{bad} row 1: field 'q' is missing or not text"):
        load_prompts(cfg, tokenizer)
    cfg = DataConfig(train_files=[str(good)], prompt_key="q", answer_key="meta.answer", template="raw")
    with pytest.raises(UserError, match=rf"{good} row 0: field 'meta.answer' is missing"):
        load_prompts(cfg, tokenizer)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"q": "1=", "meta": {"gt": "1"}}\n{"q": \n')
    with pytest.raises(UserError, match=rf"{broken} could not be read as a dataset"):
        load_prompts(DataConfig(train_files=[str(broken)], prompt_key="q", answer_key="meta.gt"), tokenizer)


def test_order_is_seeded_covers_each_epoch_and_resumes_mid_epoch():
    a = PromptStream(10, seed=3)
    first = a.take(10)
    assert sorted(first) == list(range(10)) and first != list(range(10))
    b = PromptStream(10, seed=3)
    assert b.take(4) == first[:4]
    state = b.state()
    resumed = PromptStream(10, seed=3)
    resumed.restore(state)
    assert resumed.take(13) == b.take(13)  # crosses into the next epoch, in the same new order
    assert PromptStream(10, seed=4).take(10) != first
