"""Training prompts: files through ``datasets``, prompt templates, length filtering, a resumable order.

Everything here runs on the driver (trainer rank 0); ``read_rows`` also in ``flowrl train`` before any rank
starts, which is why torch is imported only where an order is drawn.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowrl_megatron.config import DataConfig
from flowrl_megatron.errors import UserError

DAPO_PREFIX = ("Solve the following math problem step by step. The last line of your response should be of the "
               "form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n")
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'


@dataclass(frozen=True)
class Prompt:
    row: int  # position in the loaded dataset (files concatenated in order)
    token_ids: list[int]
    answer: str


def read_table(path: Path):
    """A data file (or a saved dataset directory) as a ``datasets`` table; what cannot be read is one sentence."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # a file it cannot parse: our sentence says why
    if path.is_file() and path.stat().st_size == 0:
        raise UserError(f"{path} has no rows; give a file with at least one row.")
    try:
        if path.is_dir():
            return datasets.load_from_disk(str(path))
        kind = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}.get(path.suffix)
        if kind is None:
            raise UserError(f"{path}: unsupported data file type {path.suffix!r}; use .parquet, .jsonl or .json, "
                            "or a directory written by Dataset.save_to_disk.")
        return datasets.load_dataset(kind, data_files=str(path), split="train")
    except UserError:
        raise
    except Exception as e:
        while e.__cause__ is not None:  # datasets wraps the parser's own error, which says what is wrong
            e = e.__cause__
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} could not be read as a dataset: {first}") from None


def _field(row: dict, key: str) -> Any:
    value: Any = row
    for part in key.split("."):  # dotted keys reach nested fields, e.g. reward_model.ground_truth
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def render(prompt: Any, template: str, tokenizer) -> list[int]:
    """Prompt field (text, or a list of chat messages) -> token ids."""
    if template == "raw":
        if not isinstance(prompt, str):
            raise ValueError("the raw template needs a text prompt")
        return tokenizer(prompt, add_special_tokens=False)["input_ids"]
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if template == "dapo" and isinstance(prompt, str):
        messages = [{"role": "user", "content": DAPO_PREFIX + prompt + DAPO_SUFFIX}]
    if tokenizer.chat_template is None:  # a base model without one: the user turn's text
        return tokenizer("\n".join(m["content"] for m in messages), add_special_tokens=False)["input_ids"]
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return list(ids if isinstance(ids, list) else ids["input_ids"])  # transformers 5 returns a BatchEncoding


@dataclass
class PromptSet:
    prompts: list[Prompt]
    too_long: int  # filtered out: longer than max_prompt_tokens


def read_rows(cfg: DataConfig) -> Iterator[tuple[str, int, Any, str]]:
    """(file, row, prompt, answer) of every row of ``cfg.train_files``, each row's fields checked: a problem is
    one sentence naming the file, the row and the field."""
    for file in cfg.train_files:
        table = read_table(Path(file))
        if len(table) == 0:
            raise UserError(f"{file} has no rows; list a file with prompts in data.train_files.")
        for i, row in enumerate(table):
            text, answer = _field(row, cfg.prompt_key), _field(row, cfg.answer_key)
            where = f"{file} row {i}"
            if not isinstance(text, str | list) or not text:
                raise UserError(f"{where}: field {cfg.prompt_key!r} is missing or not text (got {text!r:.80}); "
                                "set data.prompt_key to the prompt column.")
            if isinstance(text, list) and not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                  for m in text):
                raise UserError(f"{where}: field {cfg.prompt_key!r} is a list but not of chat messages "
                                "({'role': ..., 'content': text}); give text or messages.")
            if cfg.template == "raw" and not isinstance(text, str):
                raise UserError(f"{where}: data.template=raw needs a text prompt, got chat messages; use "
                                "data.template=chat.")
            if answer is None:
                raise UserError(f"{where}: field {cfg.answer_key!r} is missing; set data.answer_key to the answer "
                                "column.")
            yield file, i, text, str(answer)


def load_prompts(cfg: DataConfig, tokenizer) -> PromptSet:
    prompts: list[Prompt] = []
    too_long = 0
    for row, (file, i, text, answer) in enumerate(read_rows(cfg)):
        try:
            ids = render(text, cfg.template, tokenizer)
        except (ValueError, TypeError, KeyError) as e:
            raise UserError(f"{file} row {i}: the prompt does not fit template {cfg.template!r}: {e}") from None
        if len(ids) > cfg.max_prompt_tokens:
            too_long += 1
            continue
        prompts.append(Prompt(row, ids, answer))
    if not prompts:
        raise UserError(f"no usable prompts in {cfg.train_files} ({too_long} longer than data.max_prompt_tokens="
                        f"{cfg.max_prompt_tokens}).")
    return PromptSet(prompts, too_long)


class PromptStream:
    """Epoch after epoch over the prompts, each epoch in its own seeded order; resumable from ``state()``.

    A prompt's *order* is its position in that endless sequence (``epoch x count + offset``): what names it in
    logs and checkpoints, and what ``index_at`` turns back into a prompt.
    """

    def __init__(self, count: int, seed: int, shuffle: bool = True) -> None:
        self.count, self.seed, self.shuffle = count, seed, shuffle
        self.epoch, self.offset = 0, 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> list[int]:
        import torch

        if not self.shuffle:
            return list(range(self.count))
        return torch.randperm(self.count, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            if self.offset == self.count:
                self.epoch, self.offset = self.epoch + 1, 0
                self._order = self._epoch_order()
            n = min(k - len(out), self.count - self.offset)
            out += self._order[self.offset : self.offset + n]
            self.offset += n
        return out

    @property
    def position(self) -> int:
        """The order of the next prompt ``take`` returns."""
        return self.epoch * self.count + self.offset

    def index_at(self, order: int) -> int:
        """The prompt at position ``order`` of the data order."""
        epoch, offset = divmod(order, self.count)
        if epoch == self.epoch:
            return self._order[offset]
        other = PromptStream(self.count, self.seed, self.shuffle)
        other.restore({"epoch": epoch, "offset": 0})
        return other._order[offset]

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def restore(self, state: dict[str, int]) -> None:
        self.epoch, self.offset = state["epoch"], state["offset"]
        self._order = self._epoch_order()
