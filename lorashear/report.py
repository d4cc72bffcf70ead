"""``report.json``: every number a run produced, with the protocol, checksums, versions and seed behind it.

ALGORITHM.md section 6: "Every report records model and tokenizer checksums, library versions and seed." The
report is built from the typed stage results (:class:`~lorashear.runstate.RunState`) and the export's checks.
"""

from __future__ import annotations

import logging
import os
import platform
import resource
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorashear.budget import Quotas
from lorashear.compression import ExportResult
from lorashear.config import JobSpec
from lorashear.errors import ConfigError
from lorashear.evaluation.speed import SpeedResult, speed_section
from lorashear.evaluation.tasks import sha256_file
from lorashear.evaluation.zeroshot import zeroshot_section
from lorashear.graph import Structures
from lorashear.inputs import LoadedJob
from lorashear.modeling import write_json
from lorashear.runstate import RunState

log = logging.getLogger("lorashear")


@dataclass
class RunResult:
    """What a finished run returns.

    Attributes:
        summary: headline numbers: ``params_before``, ``params_after``, ``params_target``, ``compression_ratio``
            (fraction of parameters removed, 0-1), ``ppl_dense``, ``ppl_pruned``, ``ppl_recovered``,
            ``max_abs_logit_diff``.
        report: the content of ``report.json``.
        artifacts: ``{"model", "plan", "report", "plots" (report.png), optionally "adapter", "pruned_base"}`` -> paths.
        output_dir: the directory holding them.
    """

    summary: dict[str, Any]
    report: dict[str, Any]
    artifacts: dict[str, Path]
    output_dir: Path


def peak_memory_mib(device: torch.device) -> dict[str, float]:
    """Peak resident memory of this process (and peak CUDA allocation on a GPU), MiB."""
    out = {"cpu_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def model_checksums(model_path: Path) -> dict[str, str]:
    """sha256 of the input's weight, config and tokenizer files."""
    files = sorted(model_path.glob("*")) if model_path.is_dir() else [model_path]
    return {
        f.name: sha256_file(f)
        for f in files
        if f.is_file() and f.suffix in (".safetensors", ".json", ".model", ".gguf")
    }


def summary(state: RunState, quotas: Quotas, exported: ExportResult, report: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers: parameters before/after/target, fraction removed, perplexities, exactness, and when
    measured the zero-shot averages (fractions 0-1) and the batch-1 speedups (measured and ideal from FLOPs)."""
    assert state.dense and state.pruned and state.final and state.compression
    extra: dict[str, Any] = {}
    zs = report.get("zeroshot")
    if zs:
        extra |= {"zeroshot_avg_dense": zs["dense"]["avg"], "zeroshot_avg_final": zs["final"]["avg"]}
    sp = report.get("speed")
    if sp and sp["comparison"]["rows"]:
        row = sp["comparison"]["rows"][0]
        extra |= {
            f"prefill_speedup_b{row['batch']}": row["prefill"]["speedup"],
            f"decode_speedup_b{row['batch']}": row["decode"]["speedup"],
            "ideal_speedup_flops": row["decode"]["ideal_speedup"],
        }
    return {
        "params_before": quotas.params_before,
        "params_after": exported.params,
        "params_target": quotas.params_target,
        "params_tolerance": quotas.tolerance,
        "compression_ratio": 1 - exported.params / quotas.params_before,
        "ppl_dense": state.dense.perplexity.perplexity,
        "ppl_pruned": state.pruned.perplexity.perplexity,
        "ppl_recovered": state.final.perplexity.perplexity,
        "max_abs_logit_diff": state.compression.max_abs_logit_diff,
        **extra,
    }


def build_report(
    spec: JobSpec,
    state: RunState,
    job: LoadedJob,
    structures: Structures,
    quotas: Quotas,
    exported: ExportResult,
    speed: tuple[SpeedResult, SpeedResult] | None = None,
) -> dict[str, Any]:
    """The content of ``report.json``; ``zeroshot`` and ``speed`` compare the dense and the final model (issue 6)."""
    import peft
    import transformers

    import lorashear

    assert state.dense and state.pruned and state.final and state.compression
    e = spec.evaluation
    zs_dense, zs_final = state.dense.zeroshot, state.final.zeroshot
    report: dict[str, Any] = {
        "lorashear_version": lorashear.__version__,
        "spec": spec.to_dict(),
        "zeroshot": zeroshot_section(zs_dense, zs_final) if zs_dense and zs_final else None,
        "speed": speed_section(*speed) if speed else None,
        "model": {
            "name": spec.model,
            "shape": structures.shape.__dict__,
            "checksums_sha256": model_checksums(job.model_path),
            "dense_file_bytes": exported.input_bytes,
            "pruned_file_bytes": exported.file_bytes,
        },
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "platform": platform.platform(),
            "device": str(job.device),
            "dtype": str(job.dtype),
            "threads": torch.get_num_threads(),
            "seed": spec.seed,
            "program": Path(sys.argv[0]).name if sys.argv else None,  # no server path
        },
        "structures": {"sets": structures.summary(), "spaces": structures.spaces, "checks": structures.checks},
        "quotas": quotas.to_dict(),
        "analysis": state.analysis.to_dict() if state.analysis else None,
        "lhspg": state.prune.summary() if state.prune else None,
        "compression": {
            **state.compression.summary(),
            "reload_max_abs_logit_diff": exported.reload_max_abs_logit_diff,
            "merge_max_abs_logit_diff": exported.merge_max_abs_logit_diff,
        },
        "export": {
            "architecture": exported.architecture,
            "note": exported.note,
            "dtype": exported.dtype,
            "checks": exported.checks,
            "artifacts": exported.artifacts,
            "gguf_max_abs_logit_diff": exported.gguf_max_abs_logit_diff,
        },
        "reconstruction": state.reconstruction.summary() if state.reconstruction else None,
        "recovery": state.recovery.summary() if state.recovery else None,
        "perplexity": {
            "protocol": {
                "dataset": spec.data.eval,
                "tokenizer": spec.model,
                "window": e.window,
                "stride": e.stride or e.window,
                "max_windows": e.max_windows,
                "text": "paragraphs joined by newlines; windows score every position after the first",
            },
            "dense": state.dense.perplexity.to_dict(),
            "pruned": state.pruned.perplexity.to_dict(),
            "recovered": state.final.perplexity.to_dict(),
        },
        "reference_losses": state.reference_losses,
        "sample": state.final.sample,
        "timings": state.timings,
        "memory_estimate_bytes": job.memory_estimate_bytes,
    }
    report["summary"] = summary(state, quotas, exported, report)
    return report


def draw_report(report: dict[str, Any], staging: Path, output_dir: Path) -> dict[str, Path]:
    """Draw ``report.png`` (:func:`lorashear.plots.render_report`) into ``staging``.

    Returns:
        ``{"plots": output_dir / "report.png"}``, or ``{}`` when matplotlib is missing or drawing failed (the
        run's numbers never depend on a picture; the failure is logged).
    """
    try:
        from lorashear.plots import render_report

        render_report(report, staging / "report.png")
    except Exception as exc:  # matplotlib missing or a drawing bug: keep the run, say why
        log.warning("report.png not drawn: %s: %s", type(exc).__name__, exc)
        (staging / "report.png").unlink(missing_ok=True)
        return {}
    return {"plots": output_dir / "report.png"}


def staging_dir(output_dir: Path) -> Path:
    """A fresh, empty sibling of ``output_dir`` to write artifacts into before :func:`publish`."""
    staging = output_dir.with_name(f".{output_dir.name}.staging-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def publish(staging: Path, output_dir: Path, files: dict[str, Any]) -> dict[str, Path]:
    """Write the JSON ``files`` into ``staging``, then rename it to ``output_dir`` (complete or not at all).

    Returns:
        ``{file stem: path under output_dir}`` (``plan``, ``report``).

    Raises:
        ConfigError: ``output_dir`` appeared while the job ran.
    """
    for name, content in files.items():
        write_json(staging / name, content)
    if output_dir.exists():
        raise ConfigError(f"output directory {output_dir.name} appeared while the job ran", field="output")
    os.replace(staging, output_dir)
    return {Path(name).stem: output_dir / name for name in files}
