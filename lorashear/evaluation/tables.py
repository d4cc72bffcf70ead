"""Plain-text tables of zero-shot and speed results (standard library only: they read the JSON dicts of
``ZeroShotResult.to_dict()``, ``SpeedResult.to_dict()`` and ``compare_speed()``, so a report or an API response can be
printed where torch is not importable)."""

from __future__ import annotations

from typing import Any


def _f(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def zeroshot_table(columns: dict[str, dict[str, Any]], paired: dict[str, Any] | None = None) -> str:
    """Per-task acc / acc_norm / n of one or more models side by side, then the averages and the protocol.

    Args:
        columns: ``{column name: ZeroShotResult.to_dict()}``, e.g. ``{"dense": ..., "final": ...}``; the tasks of
            the first column set the rows.
        paired: the change from the first column to the last on the same documents
            (:func:`lorashear.evaluation.zeroshot.paired_section`, a report's ``zeroshot.paired``): printed as
            points with their paired standard error, or nothing when ``None``.
    """
    if not columns:
        return "zero-shot: no results"
    names = list(columns)
    first = columns[names[0]]
    head = f"{'task':<12} {'n':>5}" + "".join(f" | {n + ' acc':>12} {'acc_norm':>8}" for n in names)
    lines = [head, "-" * len(head)]
    for task, row in first["tasks"].items():
        cells = []
        for n in names:
            r = columns[n]["tasks"].get(task)
            cells.append(f" | {_f(r and r['acc']):>12} {_f(r and r['acc_norm']):>8}")
        lines.append(f"{row['label']:<12} {row['n']:>5}" + "".join(cells))
    lines.append("-" * len(head))
    for key, label in (("avg", "avg"), ("avg_acc", "avg acc"), ("avg5", "avg5")):
        if any(columns[n].get(key) is not None for n in names):
            lines.append(f"{label:<18}" + "".join(f" | {_f(columns[n].get(key)):>12} {'':>8}" for n in names))
    if paired:
        key = "avg5" if paired.get("avg5") is not None else "avg"
        per_task = ", ".join(
            f"{first['tasks'][t]['label']} {100 * c['change']:+.1f} ± {100 * c['se']:.1f}"
            for t, c in paired["tasks"].items()
            if t in first["tasks"]
        )
        lines.append(
            f"change {names[0]} -> {names[-1]} on the same documents (points ± paired standard error): "
            f"{key} {100 * paired[key]:+.1f} ± {100 * paired[key + '_se']:.1f}; {per_task}"
        )
    p = first.get("protocol", {})
    lines.append(
        f"lm-eval {p.get('lm_eval_version')}, {p.get('num_fewshot', 0)}-shot, limit {p.get('limit')} per task, "
        f"batch {p.get('batch_size')}, {p.get('dtype')} on {p.get('device')}, {p.get('threads')} threads; avg = "
        "acc_norm for ARC-c/HellaSwag/OBQA, acc otherwise; avg5 = ARC-e, ARC-c, OBQA, PIQA, WinoGrande"
    )
    files = p.get("tasks") or {}
    if files:
        lines.append("files: " + ", ".join(f"{v['file']} ({v['sha256'][:12]})" for v in files.values()))
    return "\n".join(line.rstrip() for line in lines)


def speed_table(columns: dict[str, dict[str, Any]], comparison: dict[str, Any] | None = None) -> str:
    """Prefill and decode tokens/s per batch size of one or more models, with the measured and ideal speedup when
    ``comparison`` (``compare_speed(dense, final)``) is given.

    Args:
        columns: ``{column name: SpeedResult.to_dict()}``.
        comparison: the dict :func:`lorashear.evaluation.speed.compare_speed` returns, or ``None``.
    """
    if not columns:
        return "speed: no results"
    names = list(columns)
    head = f"{'batch':>5} {'phase':<8}" + "".join(f" {n + ' tok/s':>14}" for n in names)
    if comparison:
        head += f" {'speedup':>8} {'ideal':>7} {'of ideal':>8}"
    lines = [head, "-" * len(head)]
    comp_rows = {r["batch"]: r for r in (comparison or {}).get("rows", [])}
    for row in columns[names[0]]["rows"]:
        b = row["batch"]
        for phase in ("prefill", "decode"):
            cells = []
            for n in names:
                other = next((r for r in columns[n]["rows"] if r["batch"] == b), None)
                cells.append(f" {_f(other and other[f'{phase}_tokens_per_s'], 1):>14}")
            line = f"{b:>5} {phase:<8}" + "".join(cells)
            c = comp_rows.get(b, {}).get(phase)
            if c:
                line += f" {c['speedup']:>7.2f}x {c['ideal_speedup']:>6.2f}x {c['of_ideal']:>8.0%}"
            lines.append(line)
    p = columns[names[0]].get("protocol", {})
    lines.append(
        f"prompt {p.get('prompt_len')} + {p.get('new_tokens')} new tokens, greedy with KV cache, median of "
        f"{p.get('repeats')} after {p.get('warmup')} warm-up, {p.get('dtype')} on {p.get('device')}, "
        f"{p.get('threads')} threads, load average {p.get('load_average_1m')}"
    )
    if comparison:
        ideal = comparison["ideal"]
        lines.append(
            f"ideal speedup from counts: parameters {ideal['params']:.2f}x, FLOPs prefill "
            f"{ideal['flops_prefill']:.2f}x, decode {ideal['flops_decode']:.2f}x; 'of ideal' = measured / FLOP ideal"
        )
    return "\n".join(lines)
