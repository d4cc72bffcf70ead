"""Text and instruction data: reading, tokenizing, deterministic batch sampling.

Text files: paragraphs separated by blank lines, joined with ``"\\n"`` (the protocol of the bundled model's
published perplexity). JSON lines: ``{"text": ...}`` records, or instruction records ``{"instruction", "input"?,
"output"}`` formatted with a prompt template (:data:`PROMPT_TEMPLATES`, Alpaca's by default); the loss covers only
the response tokens. Batches are padded on
the right (ALGORITHM.md section 7).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorashear.errors import DataError


@dataclass(frozen=True)
class PromptTemplate:
    """How an instruction record ``{"instruction", "input"?, "output"}`` becomes ``(prompt, target)`` text.

    ``prompt`` and ``with_input`` are ``str.format`` strings over ``{instruction}`` (and ``{input}`` in
    ``with_input``), used for records without and with an input; ``target_prefix`` goes before the output (the
    loss covers the prefix and the output).
    """

    prompt: str
    with_input: str
    target_prefix: str = ""

    def render(self, row: dict[str, Any]) -> tuple[str, str]:
        """``(prompt, target)`` of one instruction record."""
        inp = str(row.get("input") or "")
        fmt = self.with_input if inp else self.prompt
        return fmt.format(instruction=row["instruction"], input=inp), self.target_prefix + str(row["output"])


PROMPT_TEMPLATES: dict[str, PromptTemplate] = {
    "alpaca": PromptTemplate(
        "### Instruction:\n{instruction}\n\n### Response:\n",
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
    ),
    "question_answer": PromptTemplate(
        "Question: {instruction}\nAnswer:", "Question: {instruction}\n{input}\nAnswer:", target_prefix=" "
    ),
}
"""Named values of ``data.prompt_template`` (issue 9): ``alpaca``, the Alpaca paper's (the default), and
``question_answer``, the ``Question: ...`` / ``Answer: ...`` shape of lm-eval's ARC and PIQA prompts (target
after one space, as lm-eval's ``target_delimiter``)."""

ALPACA = PROMPT_TEMPLATES["alpaca"]
"""The default template (every run before ``data.prompt_template`` existed used it)."""


def prompt_template(value: str) -> PromptTemplate:
    """The template ``data.prompt_template`` names: a key of :data:`PROMPT_TEMPLATES`, or a custom format string
    over ``{instruction}`` and ``{input}`` (an absent input renders as an empty string). The spec validated it."""
    if value in PROMPT_TEMPLATES:
        return PROMPT_TEMPLATES[value]
    return PromptTemplate(value, value)


def read_text(path: Path, field: str = "data") -> str:
    """Paragraphs of a text file joined by newlines.

    Raises:
        DataError: unreadable or empty file.
    """
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{field}: cannot read {path.name}: {exc}", field=field) from None
    paras = [p.strip() for p in raw.split("\n\n") if p.strip()]
    if not paras:
        raise DataError(f"{field}: {path.name} holds no text", field=field)
    return "\n".join(paras)


def read_records(path: Path, field: str = "data") -> list[dict[str, str]]:
    """Records of a ``.jsonl`` file or a ``.json`` array (``text`` or ``instruction``/``input``/``output``), or one
    per paragraph of a text file (``{"text": paragraph}``).

    Raises:
        DataError: malformed JSON, a record without ``text`` or ``instruction``+``output``, or no records.
    """
    if path.suffix not in (".jsonl", ".json"):
        return [{"text": p} for p in read_text(path, field).split("\n")]
    rows: list[dict[str, str]] = []
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{field}: cannot read {path.name}: {exc}", field=field) from None
    if path.suffix == ".json":  # one JSON array of records (the Alpaca release format)
        try:
            items = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DataError(f"{field}: {path.name}: malformed JSON ({exc.msg})", field=field) from None
        if not isinstance(items, list):
            raise DataError(f"{field}: {path.name}: expected a JSON array of records", field=field)
        lines = [json.dumps(x) for x in items]
    else:
        lines = raw.splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{field}: {path.name} line {i}: malformed JSON ({exc.msg})", field=field) from None
        if not isinstance(row, dict) or not (
            isinstance(row.get("text"), str) or (isinstance(row.get("instruction"), str) and "output" in row)
        ):
            raise DataError(
                f"{field}: {path.name} line {i}: expected {{'text'}} or {{'instruction', 'output'}}", field=field
            )
        rows.append(row)
    if not rows:
        raise DataError(f"{field}: {path.name} holds no records", field=field)
    return rows


def format_record(row: dict[str, Any], template: PromptTemplate = ALPACA) -> tuple[str, str]:
    """``(prompt, target)``: the loss is taken on ``target`` only. Plain text records have an empty prompt;
    instruction records are rendered with ``template``."""
    if "text" in row and "instruction" not in row:
        return "", str(row["text"])
    return template.render(row)


def read_corpus(path: Path, field: str = "data", template: PromptTemplate = ALPACA) -> str:
    """One text from the records of :func:`read_records` (a text file's paragraphs, or a ``.json`` / ``.jsonl``
    record file), each rendered as its prompt followed by its target (:func:`format_record`), joined by newlines:
    for a text file the same text as :func:`read_text`. The analysis reads ``data.calibration`` so, which lets a job
    calibrate on its instruction data (issue 9).

    Raises:
        DataError: as :func:`read_text` and :func:`read_records`.
    """
    return "\n".join(p + t for p, t in (format_record(r, template) for r in read_records(path, field)))


@dataclass
class TokenStream:
    """A tokenized text as one long sequence, sampled in random windows.

    Attributes:
        ids: token ids, shape ``(n_tokens,)``.
    """

    ids: torch.Tensor

    @classmethod
    def from_text(cls, text: str, tokenizer: Any, *, max_tokens: int | None = None) -> TokenStream:
        """Tokenize with the tokenizer's special tokens (a leading BOS where it adds one)."""
        ids = tokenizer(text, verbose=False).input_ids
        if max_tokens is not None:
            ids = ids[:max_tokens]
        return cls(torch.tensor(ids, dtype=torch.long))

    def __len__(self) -> int:
        return int(self.ids.numel())

    def sample(self, batch_size: int, seq_len: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """``batch_size`` random windows of ``seq_len`` tokens: ``input_ids`` and ``labels``, ``(B, T)``.

        Raises:
            DataError: the stream is shorter than ``seq_len``.
        """
        n = len(self)
        if n < seq_len:
            raise DataError(f"data holds {n} tokens, fewer than seq_len={seq_len}", field="data")
        starts = torch.randint(0, n - seq_len + 1, (batch_size,), generator=gen)
        x = torch.stack([self.ids[s : s + seq_len] for s in starts.tolist()])  # (B, T)
        return {"input_ids": x, "labels": x.clone()}

    def windows(self, seq_len: int, limit: int | None = None) -> list[torch.Tensor]:
        """Consecutive non-overlapping windows of ``seq_len`` tokens (the last partial one dropped)."""
        out = [self.ids[i : i + seq_len] for i in range(0, len(self) - seq_len + 1, seq_len)]
        return out[:limit] if limit is not None else out


@dataclass
class RecordSet:
    """Prompt/target records (instruction data, or paragraphs), batched with right padding and loss masking."""

    records: list[tuple[list[int], list[int]]]
    pad_id: int

    @classmethod
    def from_rows(
        cls,
        rows: list[dict[str, Any]],
        tokenizer: Any,
        seq_len: int,
        template: PromptTemplate = ALPACA,
    ) -> RecordSet:
        """Tokenize rows (instruction records rendered with ``template``); targets end with EOS; sequences are cut
        at ``seq_len`` tokens."""
        recs = []
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        for row in rows:
            prompt, target = format_record(row, template)
            p_ids = tokenizer(prompt, verbose=False).input_ids if prompt else [tokenizer.bos_token_id or 0]
            t_ids = tokenizer(target, add_special_tokens=False, verbose=False).input_ids + eos
            p_ids = p_ids[: max(1, seq_len // 2)]
            t_ids = t_ids[: seq_len - len(p_ids)]
            if t_ids:
                recs.append((p_ids, t_ids))
        return cls(recs, int(tokenizer.pad_token_id or 0))

    def __len__(self) -> int:
        return len(self.records)

    def batch(self, idx: list[int]) -> dict[str, torch.Tensor]:
        """Right-padded batch: ``input_ids``, ``attention_mask``, ``labels`` (-100 on prompt and padding), (B, T)."""
        seqs = [self.records[i] for i in idx]
        width = max(len(p) + len(t) for p, t in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        labels = torch.full((len(seqs), width), -100, dtype=torch.long)
        for b, (p, t) in enumerate(seqs):
            n = len(p) + len(t)
            ids[b, :n] = torch.tensor(p + t)
            mask[b, :n] = 1
            labels[b, len(p) : n] = torch.tensor(t)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def sample(self, batch_size: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """A random batch of records."""
        idx = torch.randint(0, len(self), (batch_size,), generator=gen).tolist()
        return self.batch(idx)


@dataclass
class SubDataset:
    """One named sub-dataset: a training sampler and fixed validation batches (ALGORITHM.md section 5)."""

    name: str
    train: TokenStream | RecordSet
    val_batches: list[dict[str, torch.Tensor]]

    def sample(self, batch_size: int, seq_len: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """A training batch (token windows, or right-padded records), ``(B, T)`` tensors."""
        if isinstance(self.train, TokenStream):
            return self.train.sample(batch_size, seq_len, gen)
        return self.train.sample(batch_size, gen)
