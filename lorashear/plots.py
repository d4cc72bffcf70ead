"""``report.png``: the pictures of a run, drawn from ``report.json`` alone (issue 8).

Four panels, so a user who only downloads the artifacts sees what the numbers say:

1. **Sensitivity map** (ALGORITHM.md section 2): per layer and node group (attention, MLP), the loss increase in
   nats when the analysed fraction of its groups is ablated; a heatmap, layers across.
2. **Kept widths per layer**: attention heads and MLP intermediate channels kept, as fractions 0-1 of the dense
   model's (the per-layer layout varies them; the uniform layout is flat).
3. **Loss curves**: LHSPG and recovery training loss per optimizer step (nats per token), with the LHSPG period
   boundaries.
4. **Recovery mix weights** per round and sub-dataset (the dynamic knowledge recovery of section 5).

Uses matplotlib's non-interactive Agg backend; drawing never touches a display and never changes the global
backend of the calling program.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def _per_layer(value: Any, n_layers: int) -> list[float]:
    if isinstance(value, list):
        return [float(v) for v in value]
    return [float(value)] * n_layers


def render_report(report: dict[str, Any], path: str | Path, *, dpi: int = 110) -> Path:
    """Draw ``report.png`` from a run's report.

    Args:
        report: the content of ``report.json`` (:func:`lorashear.report.build_report`).
        path: where to write the PNG (its parent must exist).
        dpi: resolution; the figure is 12 x 9 inches.

    Returns:
        ``path``.

    Raises:
        ImportError: matplotlib is not installed.
    """
    from matplotlib.figure import Figure  # the object API: no pyplot, no global backend switch
    from matplotlib.ticker import MaxNLocator

    shape = (report.get("model") or {}).get("shape") or {}
    n_layers = int(shape.get("num_layers") or 0)
    fig = Figure(figsize=(12, 9), dpi=dpi, layout="constrained")
    axes = fig.subplots(2, 2)
    title = f"{report.get('spec', {}).get('model', 'model')}: " + _headline(report.get("summary") or {})
    fig.suptitle(title, fontsize=11)

    # 1. sensitivity map
    ax = axes[0][0]
    layer_map = (report.get("analysis") or {}).get("layer_map") or []
    if layer_map:
        n = max(int(r["layer"]) for r in layer_map) + 1
        grid = [[math.nan] * n for _ in range(2)]
        for r in layer_map:
            grid[0 if r["node_group"] == "attention" else 1][int(r["layer"])] = float(r["deviation"])
        im = ax.imshow(grid, aspect="auto", cmap="magma", interpolation="nearest")
        ax.set_yticks([0, 1], ["attention", "MLP"])
        ax.set_xlabel("layer")
        fig.colorbar(im, ax=ax, label="loss increase when ablated (nats)")
    else:
        ax.text(0.5, 0.5, "no analysis in this report", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("Sensitivity map (knowledge distribution)", fontsize=10)

    # 2. kept widths per layer
    ax = axes[0][1]
    kept = (report.get("quotas") or {}).get("kept") or {}
    if kept and n_layers:
        xs = list(range(n_layers))
        h0, i0 = float(shape.get("num_heads") or 1), float(shape.get("intermediate_size") or 1)
        heads = _per_layer(kept.get("num_attention_heads", h0), n_layers)
        inter = _per_layer(kept.get("intermediate_size", i0), n_layers)
        ax.step(xs, [h / h0 for h in heads], where="mid", label=f"attention heads (of {int(h0)})")
        ax.step(xs, [i / i0 for i in inter], where="mid", label=f"MLP channels (of {int(i0)})")
        if "num_key_value_heads" in kept and shape.get("num_kv_heads"):
            kv0 = float(shape["num_kv_heads"])
            kv = _per_layer(kept["num_key_value_heads"], n_layers)
            ax.step(xs, [k / kv0 for k in kv], where="mid", linestyle=":", label=f"KV heads (of {int(kv0)})")
        ax.set_ylim(0, 1.05)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer")
        ax.set_ylabel("kept fraction")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Kept widths per layer", fontsize=10)

    # 3. loss curves
    ax = axes[1][0]
    lh = (report.get("lhspg") or {}).get("losses") or []
    rc = (report.get("recovery") or {}).get("losses") or []
    if lh:
        ax.plot(range(1, len(lh) + 1), lh, label="LHSPG", linewidth=1)
        for h in (report.get("lhspg") or {}).get("history") or []:
            ax.axvline(int(h.get("step", 0)), color="grey", linewidth=0.5, linestyle=":")
    if rc:
        ax.plot(range(len(lh) + 1, len(lh) + len(rc) + 1), rc, label="recovery", linewidth=1)
    if lh or rc:
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss (nats/token)")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no training in this run", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("Loss curves (dotted: LHSPG periods)", fontsize=10)

    # 4. mix weights per round
    ax = axes[1][1]
    rounds = (report.get("recovery") or {}).get("rounds") or []
    if rounds:
        names = sorted({n for r in rounds for n in r.get("datasets", {})})
        labels = [f"s{r['stage']}r{int(r['round']) + 1}" for r in rounds]
        for name in names:
            ys = [r["datasets"].get(name, {}).get("weight", math.nan) for r in rounds]
            ax.plot(labels, ys, marker="o", label=name)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("recovery stage / round")
        ax.set_ylabel("sampling weight")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no recovery rounds", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("Recovery mix weights", fontsize=10)

    out = Path(path)
    fig.savefig(out, format="png")
    return out


def _headline(s: dict[str, Any]) -> str:
    parts = []
    if "compression_ratio" in s:
        parts.append(f"{s['compression_ratio']:.1%} of parameters removed")
    if s.get("ppl_dense") is not None and s.get("ppl_recovered") is not None:
        parts.append(f"perplexity {s['ppl_dense']:.2f} dense -> {s['ppl_recovered']:.2f} recovered")
    return ", ".join(parts)
