"""Zero-shot task definitions and their file checks (standard library only: the pre-flight imports this module).

Each task is an lm-eval multiple-choice task (the YAML in ``lm_tasks/``, prompts and metrics as lm-eval's stock
task of the same name) over one JSON-lines file in llm-foundry's layout (``scripts/eval/local_data``):

- ``mc`` (ARC-e, ARC-c, BoolQ, HellaSwag, OpenBookQA, PIQA): ``{"query": str, "choices": [str, ...], "gold": int}``.
  lm-eval scores ``doc_to_text(query) + " " + choice`` for every choice; ``gold`` indexes ``choices``.
- ``partial`` (WinoGrande): ``{"context_options": [str, ...], "continuation": str, "gold": int}``. lm-eval scores
  ``context_option + " " + continuation`` for every option (partial evaluation); ``gold`` indexes the options.

A task's file is ``<task_dir>/<file>`` under the data root (``file`` as llm-foundry names it, e.g.
``openbook_qa.jsonl`` for ``openbookqa``) unless ``evaluation.zeroshot.files`` names another one.

Headline metric per task (the LLM-Pruner / LoRAShear table convention): ``acc_norm`` (length-normalised accuracy)
for ARC-c, HellaSwag and OpenBookQA, ``acc`` for the others (BoolQ and WinoGrande have no ``acc_norm`` in lm-eval).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorashear.config import ZEROSHOT_TASKS, ZeroShotConfig, check_name
from lorashear.errors import ConfigError, DataError

LM_TASK_DIR = Path(__file__).resolve().parent / "lm_tasks"
"""Folder of the lm-eval task YAMLs (one ``<task>.yaml`` per task; lm-eval task name ``lorashear_<task>``)."""


@dataclass(frozen=True)
class TaskDef:
    """One shipped zero-shot task.

    Attributes:
        name: the spec's name (``evaluation.zeroshot.tasks``), lm-eval's stock task name.
        file: file name in a task directory (llm-foundry's name).
        layout: ``mc`` or ``partial`` (module docstring).
        headline: the metric averaged in ``avg``: ``acc`` or ``acc_norm``.
        metrics: metrics lm-eval reports for the task.
        label: display name.
    """

    name: str
    file: str
    layout: str
    headline: str
    metrics: tuple[str, ...]
    label: str

    @property
    def lm_eval_name(self) -> str:
        """Task name registered with lm-eval (prefixed so it never shadows a stock task)."""
        return f"lorashear_{self.name}"

    @property
    def yaml_path(self) -> Path:
        """The task's lm-eval YAML."""
        return LM_TASK_DIR / f"{self.name}.yaml"


_BOTH = ("acc", "acc_norm")
TASKS: dict[str, TaskDef] = {
    t.name: t
    for t in (
        TaskDef("arc_easy", "arc_easy.jsonl", "mc", "acc", _BOTH, "ARC-e"),
        TaskDef("arc_challenge", "arc_challenge.jsonl", "mc", "acc_norm", _BOTH, "ARC-c"),
        TaskDef("boolq", "boolq.jsonl", "mc", "acc", ("acc",), "BoolQ"),
        TaskDef("hellaswag", "hellaswag.jsonl", "mc", "acc_norm", _BOTH, "HellaSwag"),
        TaskDef("openbookqa", "openbook_qa.jsonl", "mc", "acc_norm", _BOTH, "OBQA"),
        TaskDef("piqa", "piqa.jsonl", "mc", "acc", _BOTH, "PIQA"),
        TaskDef("winogrande", "winogrande.jsonl", "partial", "acc", ("acc",), "WinoGrande"),
    )
}
"""The shipped tasks by spec name; the keys are :data:`lorashear.config.ZEROSHOT_TASKS`."""
assert set(TASKS) == set(ZEROSHOT_TASKS)

AVG5_TASKS = ("arc_easy", "arc_challenge", "openbookqa", "piqa", "winogrande")
"""Tasks of ``avg5``: the headline metric averaged over ARC-e, ARC-c, OBQA, PIQA and WinoGrande."""

CHECK_LINES = 5
"""Lines of each task file that the cheap pre-flight check parses."""


def task_file_name(cfg: ZeroShotConfig, task: str) -> tuple[str, str]:
    """The file of ``task`` as a name under the data root, and the spec field that decides it.

    Returns:
        ``(name, field)``, e.g. ``("zeroshot/piqa.jsonl", "evaluation.zeroshot.task_dir")``.
    """
    if task in cfg.files:
        return cfg.files[task], f"evaluation.zeroshot.files.{task}"
    return f"{cfg.task_dir}/{TASKS[task].file}", "evaluation.zeroshot.task_dir"


def check_record(doc: Any, layout: str, where: str, field: str) -> None:
    """Check one parsed line against a layout.

    Raises:
        DataError: a missing key, a wrong type, fewer than two choices, or ``gold`` out of range; the message
            names ``where`` (file and line).
    """

    def bad(msg: str) -> DataError:
        expected = (
            '{"query": str, "choices": [str, ...], "gold": int}'
            if layout == "mc"
            else '{"context_options": [str, ...], "continuation": str, "gold": int}'
        )
        return DataError(f"{field}: {where}: {msg} (expected the llm-foundry layout {expected})", field=field)

    if not isinstance(doc, dict):
        raise bad(f"expected a JSON object, got {type(doc).__name__}")
    text_key, options_key = ("query", "choices") if layout == "mc" else ("continuation", "context_options")
    for key in (text_key, options_key, "gold"):
        if key not in doc:
            raise bad(f"missing key {key!r}")
    if not isinstance(doc[text_key], str):
        raise bad(f"{text_key!r} is not a string")
    options = doc[options_key]
    if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
        raise bad(f"{options_key!r} must be a list of at least two strings")
    gold = doc["gold"]
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(options):
        raise bad(f"'gold' must be an integer index into {options_key!r} (0-{len(options) - 1}), got {gold!r}")


def read_task_docs(path: Path, task: str, field: str, *, max_lines: int | None = None) -> list[dict[str, Any]]:
    """Parse and check a task file (all of it, or its first ``max_lines`` non-blank lines).

    Raises:
        DataError: unreadable file, malformed JSON, a record in the wrong layout, or no records.
    """
    layout = TASKS[task].layout
    docs: list[dict[str, Any]] = []
    try:
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{path.name} line {lineno}"
                try:
                    doc = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{field}: {where}: malformed JSON ({exc.msg})", field=field) from None
                check_record(doc, layout, where, field)
                docs.append(doc)
                if max_lines is not None and len(docs) >= max_lines:
                    break
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{field}: cannot read {path.name}: {exc}", field=field) from None
    if not docs:
        raise DataError(f"{field}: {path.name} holds no records", field=field)
    return docs


def resolve_task_file(cfg: ZeroShotConfig, task: str, data_root: Path) -> tuple[Path, str, str]:
    """Path of a task's file under the data root, its name relative to the root, and the field that names it.

    Raises:
        ConfigError: unknown task, or a name that is invalid or resolves outside the data root.
        DataError: the file does not exist or is empty.
    """
    if task not in TASKS:
        raise ConfigError(
            f"evaluation.zeroshot.tasks: unknown task {task!r}; known: {', '.join(ZEROSHOT_TASKS)}",
            field="evaluation.zeroshot.tasks",
        )
    name, field = task_file_name(cfg, task)
    check_name(field, name)
    root = Path(data_root).resolve()
    path = (root / name).resolve()
    if root not in path.parents:
        raise ConfigError(f"{field}: {name!r} resolves outside the data root", field=field)
    if not path.is_file():
        raise DataError(f"{field}: no file {name!r} for task {task!r} under the data root", field=field)
    if path.stat().st_size == 0:
        raise DataError(f"{field}: task file {name!r} is empty", field=field)
    return path, name, field


def check_tasks(cfg: ZeroShotConfig, data_root: Path) -> dict[str, Path]:
    """Cheap check of every configured task: a known name, its file present under the data root, and its first
    :data:`CHECK_LINES` lines in the task's layout. Reads a few lines per file, no model, no lm-eval.

    Returns:
        ``{task: path}`` of the task files.

    Raises:
        ConfigError: an unknown task name (``field`` ``evaluation.zeroshot.tasks[i]``) or an invalid file name.
        DataError: a missing, empty or malformed file, or one in the wrong layout (``field`` names the spec field
            that chose the file: ``evaluation.zeroshot.task_dir`` or ``evaluation.zeroshot.files.<task>``).
    """
    paths: dict[str, Path] = {}
    for i, task in enumerate(cfg.tasks):
        if task not in TASKS:
            raise ConfigError(
                f"evaluation.zeroshot.tasks[{i}]: unknown task {task!r}; known: {', '.join(ZEROSHOT_TASKS)}",
                field=f"evaluation.zeroshot.tasks[{i}]",
            )
        path, _, field = resolve_task_file(cfg, task, data_root)
        read_task_docs(path, task, field, max_lines=CHECK_LINES)
        paths[task] = path
    return paths


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
