"""Zero-shot accuracy through lm-eval itself (ALGORITHM.md section 6).

The model in memory (a Hugging Face causal LM, possibly wrapped by PEFT) is handed to lm-eval's own ``HFLM``; the
tasks are lm-eval ``ConfigurableTask`` s built from the YAMLs in ``lm_tasks/`` (loaded through a ``TaskManager``
whose include path is that folder, stock tasks excluded), so request building, prompts, batching and metrics are
lm-eval's. The only difference from a stock ``lm_eval --include_path lorashear/evaluation/lm_tasks`` run is where
the documents come from: the task file under the data root, read and checked by :mod:`lorashear.evaluation.tasks`
(``custom_dataset``), never a hub. ``tests/lib/test_zeroshot.py`` checks that the numbers equal stock ``HFLM``
loading the model directory.

Zero-shot only (``num_fewshot`` 0), no chat template, the first ``limit`` documents of each file.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorashear.config import ZeroShotConfig
from lorashear.evaluation.tasks import (
    AVG5_TASKS,
    LM_TASK_DIR,
    TASKS,
    check_tasks,
    read_task_docs,
    resolve_task_file,
    sha256_file,
)

log = logging.getLogger(__name__)


@dataclass
class TaskScore:
    """lm-eval's metrics for one task.

    Attributes:
        task: spec name (e.g. ``piqa``); label: display name (``PIQA``).
        acc: accuracy, fraction 0-1; acc_stderr: its standard error (lm-eval's, sample std / sqrt(n)).
        acc_norm: accuracy when each choice's log-likelihood is divided by its length in characters, fraction 0-1;
            ``None`` for tasks where lm-eval does not report it (BoolQ, WinoGrande). acc_norm_stderr likewise.
        n: documents scored.
        headline: the metric used in ``avg`` for this task (``acc`` or ``acc_norm``).
        outcomes: the headline metric of each document in file order, ``"1"`` right and ``"0"`` wrong
            (``n`` characters; lm-eval's per-sample log), so two models scored on the same documents compare
            pairwise (:func:`paired_change`); ``""`` in results recorded before it was kept.
    """

    task: str
    label: str
    acc: float
    acc_stderr: float | None
    acc_norm: float | None
    acc_norm_stderr: float | None
    n: int
    headline: str
    outcomes: str = ""

    @property
    def score(self) -> float:
        """The headline metric's value, fraction 0-1."""
        value = self.acc_norm if self.headline == "acc_norm" else self.acc
        return float(value if value is not None else self.acc)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``score`` included)."""
        return {
            "task": self.task,
            "label": self.label,
            "acc": self.acc,
            "acc_stderr": self.acc_stderr,
            "acc_norm": self.acc_norm,
            "acc_norm_stderr": self.acc_norm_stderr,
            "n": self.n,
            "headline": self.headline,
            "score": self.score,
            "outcomes": self.outcomes,
        }


@dataclass
class ZeroShotResult:
    """Zero-shot scores of one model and the protocol that produced them.

    Attributes:
        tasks: ``{task: TaskScore}`` in the configured order.
        avg: mean of the tasks' headline metric (``acc_norm`` for ARC-c, HellaSwag, OBQA; ``acc`` otherwise),
            fraction 0-1, over every scored task.
        avg_acc: mean ``acc`` over every scored task, fraction 0-1.
        avg5: mean headline metric over ARC-e, ARC-c, OBQA, PIQA and WinoGrande; ``None`` unless all five were
            scored.
        protocol: lm-eval version, ``num_fewshot`` 0, limit, batch size, each task's file (name relative to the
            data root, sha256, lines, lm-eval task name, YAML sha256), dtype, device, torch threads, seconds.
    """

    tasks: dict[str, TaskScore]
    avg: float
    avg_acc: float
    avg5: float | None
    protocol: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: ``{"tasks": {task: {...}}, "avg", "avg_acc", "avg5", "protocol"}``."""
        return {
            "tasks": {k: v.to_dict() for k, v in self.tasks.items()},
            "avg": self.avg,
            "avg_acc": self.avg_acc,
            "avg5": self.avg5,
            "protocol": dict(self.protocol),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ZeroShotResult:
        """Inverse of :meth:`to_dict` (checkpoints)."""
        tasks = {k: TaskScore(**{f: v for f, v in t.items() if f != "score"}) for k, t in data["tasks"].items()}
        return cls(tasks, data["avg"], data["avg_acc"], data["avg5"], dict(data.get("protocol") or {}))


def _docs_dataset(docs: list[dict[str, Any]], **_: Any) -> Any:
    """``custom_dataset`` of an lm-eval task: the checked documents as a one-split ``DatasetDict`` (in memory)."""
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def task_config(task: str, docs: list[dict[str, Any]] | None = None, data_file: Path | None = None) -> dict[str, Any]:
    """lm-eval config dict of a shipped task, from its YAML.

    Args:
        task: spec name.
        docs: documents to evaluate (replaces the YAML's data file with an in-memory dataset).
        data_file: alternatively, the JSON-lines file lm-eval's ``json`` loader should read (stock lm-eval path).
    """
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = dict(load_yaml(TASKS[task].yaml_path, resolve_func=True))
    if docs is not None:
        cfg.pop("dataset_kwargs", None)
        cfg["custom_dataset"] = functools.partial(_docs_dataset, docs)
    elif data_file is not None:
        cfg["dataset_kwargs"] = {"data_files": {"test": str(data_file)}}
    return cfg


def task_manager() -> Any:
    """lm-eval ``TaskManager`` over the shipped YAMLs only (no index of lm-eval's stock tasks)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(LM_TASK_DIR), include_defaults=False)


def scores_from_results(results: dict[str, Any], task: str) -> TaskScore:
    """A :class:`TaskScore` from lm-eval's ``evaluate`` / ``simple_evaluate`` output for one shipped task."""
    td = TASKS[task]
    row = results["results"][td.lm_eval_name]

    def metric(name: str) -> float | None:
        v = row.get(f"{name},none")
        return float(v) if isinstance(v, (int, float)) else None

    n = results.get("n-samples", {}).get(td.lm_eval_name, {}).get("effective")
    acc = metric("acc")
    if acc is None:
        raise RuntimeError(f"lm-eval returned no acc for {td.lm_eval_name}: {sorted(row)}")
    return TaskScore(
        task=task,
        label=td.label,
        acc=acc,
        acc_stderr=metric("acc_stderr"),
        acc_norm=metric("acc_norm") if "acc_norm" in td.metrics else None,
        acc_norm_stderr=metric("acc_norm_stderr") if "acc_norm" in td.metrics else None,
        n=int(n) if n is not None else 0,
        headline=td.headline,
        outcomes=_outcomes(results, task) if results.get("samples") else "",
    )


def _outcomes(results: dict[str, Any], task: str) -> str:
    """The headline metric per document from lm-eval's logged samples, in document order (see
    :attr:`TaskScore.outcomes`).

    Raises:
        RuntimeError: lm-eval logged no samples for the task or a value other than 0 / 1.
    """
    td = TASKS[task]
    samples = (results.get("samples") or {}).get(td.lm_eval_name)
    if not samples:
        raise RuntimeError(f"lm-eval logged no samples for {td.lm_eval_name}")
    out = []
    for sample in sorted(samples, key=lambda x: int(x["doc_id"])):
        value = float(sample[td.headline])
        if value not in (0.0, 1.0):
            raise RuntimeError(f"{td.lm_eval_name} doc {sample['doc_id']}: {td.headline} {value!r} is not 0 or 1")
        out.append("1" if value else "0")
    return "".join(out)


def paired_change(before: str, after: str) -> dict[str, float | int]:
    """Change of accuracy from one model to another on the same documents, with the paired standard error.

    Two models scored on the same documents are mostly right and wrong together, so the standard error of the
    difference of their per-document outcomes is well below what two independent accuracies would give: it is
    what tells a real change from the noise of ``n`` documents.

    Args:
        before, after: :attr:`TaskScore.outcomes` of the two models on the same task and documents.

    Returns:
        ``{"change": accuracy after - before (fraction, -1..1), "se": std(d) / sqrt(n) of the per-document
        differences d in {-1, 0, 1} (0 when n < 2), "n", "gained": documents only ``after`` gets right, "lost":
        documents only ``before`` gets right}``.

    Raises:
        ValueError: empty outcomes, different lengths, or characters other than ``0`` / ``1``.
    """
    if not before or len(before) != len(after) or set(before + after) - {"0", "1"}:
        raise ValueError(
            f"per-document outcomes must be equal-length strings of 0/1, got lengths {len(before)} and {len(after)}"
        )
    n = len(before)
    d = [int(a) - int(b) for a, b in zip(after, before, strict=True)]
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
    return {
        "change": mean,
        "se": (var / n) ** 0.5,
        "n": n,
        "gained": sum(1 for x in d if x > 0),
        "lost": sum(1 for x in d if x < 0),
    }


def combine_changes(changes: list[dict[str, Any]]) -> tuple[float, float]:
    """Mean of several tasks' :func:`paired_change` and its standard error, the tasks' errors combined as
    independent (``sqrt(sum se_t**2) / tasks``): the paired change of an average such as avg5 (fractions).

    Raises:
        ValueError: no changes to combine.
    """
    if not changes:
        raise ValueError("no per-task changes to combine")
    change = sum(float(c["change"]) for c in changes) / len(changes)
    se = sum(float(c["se"]) ** 2 for c in changes) ** 0.5 / len(changes)
    return change, se


def paired_section(before: ZeroShotResult, after: ZeroShotResult) -> dict[str, Any] | None:
    """Per-task :func:`paired_change` from ``before`` to ``after`` and the change of ``avg`` / ``avg5`` with its
    standard error (:func:`combine_changes`).

    Returns:
        ``{"tasks": {task: paired_change}, "avg": change, "avg_se", "avg5": change or None, "avg5_se"}``
        (fractions), or ``None`` when a shared task lacks per-document outcomes in either result or was scored
        on a different number of documents (results recorded before outcomes were kept).
    """
    shared = [t for t in before.tasks if t in after.tasks]
    if not shared:
        return None
    tasks: dict[str, dict[str, float | int]] = {}
    for t in shared:
        b, a = before.tasks[t].outcomes, after.tasks[t].outcomes
        if not b or len(b) != len(a):
            return None
        tasks[t] = paired_change(b, a)
    avg, avg_se = combine_changes(list(tasks.values()))
    five = [tasks[t] for t in AVG5_TASKS if t in tasks]
    avg5, avg5_se = combine_changes(five) if len(five) == len(AVG5_TASKS) else (None, None)
    return {"tasks": tasks, "avg": avg, "avg_se": avg_se, "avg5": avg5, "avg5_se": avg5_se}


def summarize(scores: dict[str, TaskScore]) -> tuple[float, float, float | None]:
    """``(avg, avg_acc, avg5)`` of task scores (see :class:`ZeroShotResult`); NaN averages when empty."""
    if not scores:
        return float("nan"), float("nan"), None
    avg = sum(s.score for s in scores.values()) / len(scores)
    avg_acc = sum(s.acc for s in scores.values()) / len(scores)
    avg5 = sum(scores[t].score for t in AVG5_TASKS) / len(AVG5_TASKS) if all(t in scores for t in AVG5_TASKS) else None
    return avg, avg_acc, avg5


@contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval logs a warning per call (an in-memory model, ``limit``) and draws a progress bar per task while
    building requests; keep the job's log readable (tqdm reads ``TQDM_DISABLE`` when a bar is created)."""
    lg = logging.getLogger("lm_eval")
    old, old_env = lg.level, os.environ.get("TQDM_DISABLE")
    lg.setLevel(logging.ERROR)
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        lg.setLevel(old)
        if old_env is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = old_env


def make_lm(model: nn.Module, tokenizer: Any, batch_size: int) -> Any:
    """lm-eval's ``HFLM`` around an in-memory model (its own progress bars off; nothing else changed)."""
    from lm_eval.models.huggingface import HFLM

    class _HFLM(HFLM):  # type: ignore[misc]
        def loglikelihood(self, requests: Any, disable_tqdm: bool = True) -> Any:
            return super().loglikelihood(requests, disable_tqdm=True)

    return _HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def run_zeroshot(
    model: nn.Module,
    tokenizer: Any,
    cfg: ZeroShotConfig,
    *,
    data_root: str | Path,
    on_step: Callable[[int, int, TaskScore], None] | None = None,
) -> ZeroShotResult:
    """Score ``model`` zero-shot on ``cfg.tasks`` with lm-eval (``HFLM`` around the in-memory model).

    Tasks run one after another (one lm-eval ``evaluate`` per task), so ``on_step`` can report progress and a
    cancellation hook raising from it stops the evaluation between tasks. The model's training mode is restored.

    Args:
        model: a causal LM (``PreTrainedModel`` or a PEFT model around one) on its evaluation device and dtype;
            inputs go to ``model.device``.
        tokenizer: its Hugging Face tokenizer.
        cfg: tasks, limit per task, batch size, task files.
        data_root: the directory task file names resolve under.
        on_step: called after each task with ``(tasks done, tasks in all, that task's score)``.

    Returns:
        Per-task acc / acc_norm / n, the averages and the protocol.

    Raises:
        ConfigError: an unknown task or an invalid file name (``field`` names it).
        DataError: a missing task file or one in the wrong layout (every line is checked before scoring).
    """
    from lm_eval.evaluator import evaluate

    data_root = Path(data_root)
    check_tasks(cfg, data_root)  # cheap: names and the first lines, before anything is read in full
    files: dict[str, dict[str, Any]] = {}
    docs: dict[str, list[dict[str, Any]]] = {}
    for task in cfg.tasks:
        path, name, fld = resolve_task_file(cfg, task, data_root)
        docs[task] = read_task_docs(path, task, fld)
        files[task] = {
            "file": name,
            "sha256": sha256_file(path),
            "lines": len(docs[task]),
            "lm_eval_task": TASKS[task].lm_eval_name,
            "yaml_sha256": sha256_file(TASKS[task].yaml_path),
        }

    was_training = model.training
    param = next(model.parameters())
    t0 = time.perf_counter()
    scores: dict[str, TaskScore] = {}
    try:
        with _quiet_lm_eval():
            lm = make_lm(model, tokenizer, cfg.batch_size)
            manager = task_manager()
            for i, task in enumerate(cfg.tasks):
                with torch.no_grad():
                    out = evaluate(
                        lm=lm,
                        task_dict=manager.load([task_config(task, docs=docs[task])]),
                        limit=cfg.limit,
                        log_samples=True,  # per-document outcomes, for paired comparisons
                        verbosity="ERROR",
                    )
                if out is None:  # only on non-zero ranks of a distributed run, which this never is
                    raise RuntimeError("lm-eval returned no results")
                scores[task] = scores_from_results(out, task)
                if on_step is not None:
                    on_step(i + 1, len(cfg.tasks), scores[task])
    finally:
        model.train(was_training)
    avg, avg_acc, avg5 = summarize(scores)
    protocol = {
        "harness": "lm-eval",
        "lm_eval_version": _lm_eval_version(),
        "model_class": "HFLM (in-memory model)",
        "num_fewshot": 0,
        "limit": cfg.limit,
        "batch_size": cfg.batch_size,
        "tasks": files,
        "task_dir": cfg.task_dir,
        "avg": "mean headline metric (acc_norm for arc_challenge, hellaswag, openbookqa; acc otherwise)",
        "avg5": "mean headline metric over " + ", ".join(AVG5_TASKS),
        "dtype": str(param.dtype).replace("torch.", ""),
        "device": str(param.device),
        "threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return ZeroShotResult(scores, avg, avg_acc, avg5, protocol)


_SAME = ("lm_eval_version", "num_fewshot", "limit", "batch_size", "tasks")


def zeroshot_section(dense: ZeroShotResult, final: ZeroShotResult) -> dict[str, Any]:
    """The ``zeroshot`` section of a report: both models, the per-task change and the shared protocol.

    Returns:
        ``{"dense": ZeroShotResult dict, "final": ..., "delta": {task: final score - dense score}, "avg_delta",
        "paired": the same changes per document with their paired standard errors (:func:`paired_section`; None
        for results without per-document outcomes),
        "protocol": the settings both were scored with}``; scores are the tasks' headline metrics, fractions 0-1.

    Raises:
        ValueError: the two results were not produced with the same settings (tasks, files, limit, batch size,
            lm-eval version).
    """
    for key in _SAME:
        if dense.protocol.get(key) != final.protocol.get(key):
            raise ValueError(f"dense and final zero-shot results differ in {key}; score both with the same settings")
    delta = {t: final.tasks[t].score - dense.tasks[t].score for t in dense.tasks if t in final.tasks}
    return {
        "dense": dense.to_dict(),
        "final": final.to_dict(),
        "delta": delta,
        "avg_delta": final.avg - dense.avg,
        "paired": paired_section(dense, final),
        "protocol": {k: final.protocol[k] for k in final.protocol if k != "seconds"},
    }


def zeroshot_metrics(result: ZeroShotResult, prefix: str) -> dict[str, float]:
    """Flat metrics for events and metric series, e.g. ``{"zeroshot/final/piqa/acc": 0.61, ...,
    "zeroshot/final/avg": 0.45}`` with ``prefix="zeroshot/final"`` (fractions 0-1; ``acc_norm`` where reported)."""
    out: dict[str, float] = {}
    for t, s in result.tasks.items():
        out[f"{prefix}/{t}/acc"] = s.acc
        if s.acc_norm is not None:
            out[f"{prefix}/{t}/acc_norm"] = s.acc_norm
    out[f"{prefix}/avg"] = result.avg
    out[f"{prefix}/avg_acc"] = result.avg_acc
    if result.avg5 is not None:
        out[f"{prefix}/avg5"] = result.avg5
    return out
