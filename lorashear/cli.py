"""``lorashear`` command line: run a job spec, inspect a model's structures, measure perplexity, serve the API.

Examples::

    lorashear run examples/stories260k-20.json              # the whole pipeline, artifacts under runs/
    lorashear inspect stories260K --target-ratio 0.2         # structures and per-type quotas
    lorashear eval runs/stories260k-20/model --data lorashear/assets/data/tinystories/eval.txt
    lorashear eval runs/stories260k-20/model --tasks piqa,arc_easy --limit 50 --speed   # zero-shot + speed
    lorashear serve                 # HTTP API, SQLite + in-process worker (service extra: pip install '.[service]')
    lorashear demo                  # serve, submit a job over HTTP, follow it (service extra)
    lorashear jobs submit SPEC --server URL --wait   # the HTTP client (lorashear.jobs_cli)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from lorashear.config import JobSpec, StructureConfig, field_docs, load_spec_file
from lorashear.errors import Cancelled, ConfigError, LoRAShearError
from lorashear.events import STAGES, Event
from lorashear.resolve import BUNDLED_DATA_ROOT, BUNDLED_MODEL_ROOT, Roots


def _model_path(arg: str) -> Path:
    p = Path(arg)
    if p.exists():
        return p.resolve()
    bundled = BUNDLED_MODEL_ROOT / arg
    if bundled.exists():
        return bundled
    raise ConfigError(
        f"no model at {arg!r} (a directory with config.json, a .gguf file, or a bundled name)", field="model"
    )


class _Progress:
    """tqdm bar per stage: stage name, step/total, rate and ETA; log lines above the bar."""

    def __init__(self, quiet: bool) -> None:
        from tqdm import tqdm

        self.tqdm = tqdm
        self.bar: Any = None
        self.quiet = quiet

    def __call__(self, e: Event) -> None:
        if self.quiet:
            return
        if e.kind == "stage_start":
            self.close()
            n = STAGES.index(e.stage) + 1 if e.stage in STAGES else 0
            self.bar = self.tqdm(
                total=e.total or None,
                desc=f"[{n}/{len(STAGES)}] {e.stage}",
                unit="step",
                dynamic_ncols=True,
                leave=True,
                file=sys.stderr,
                mininterval=0.5,
            )
            if e.message:
                self.bar.write(f"{e.stage}: {e.message}", file=sys.stderr)
        elif e.kind == "progress" and self.bar is not None:
            if e.total:
                self.bar.total = e.total
            if e.metrics:
                self.bar.set_postfix(
                    {k.split("/")[-1]: f"{v:.3g}" for k, v in list(e.metrics.items())[:2]}, refresh=False
                )
            self.bar.update(max(0, e.step - self.bar.n))  # honours tqdm's refresh interval
        elif e.kind in ("log", "stage_end"):
            if e.kind == "stage_end" and self.bar is not None:
                self.bar.update(max(0, e.step - self.bar.n))
            (self.bar.write if self.bar is not None else print)(f"{e.stage}: {e.message}", file=sys.stderr)
            if e.kind == "stage_end":
                self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def cmd_run(args: argparse.Namespace) -> int:
    from lorashear.pipeline import run

    spec = load_spec_file(args.spec, unknown_fields="warn" if args.allow_unknown_fields else "error")
    out = Path(args.output) if args.output else Path("runs") / Path(args.spec).stem
    roots = Roots(
        Path(args.model_root) if args.model_root else Roots.from_env().model_root,
        Path(args.data_root) if args.data_root else Roots.from_env().data_root,
    )
    progress = _Progress(args.quiet)
    t0 = time.time()
    try:
        result = run(spec, out, roots=roots, work_dir=args.work_dir, on_event=progress)
    finally:
        progress.close()
    s = result.summary
    print(f"\nLoRAShear finished in {time.time() - t0:.0f} s: {spec.model} pruned by {s['compression_ratio']:.1%}")
    print(
        f"  parameters   {s['params_before']:,} -> {s['params_after']:,} (target {s['params_target']:,} "
        f"+/- {s['params_tolerance']:,})"
    )
    proto = result.report["perplexity"]["protocol"]
    print(
        f"  perplexity   dense {s['ppl_dense']:.3f} | pruned {s['ppl_pruned']:.3f} | recovered "
        f"{s['ppl_recovered']:.3f}  ({proto['dataset']}, window {proto['window']}, stride {proto['stride']})"
    )
    print(f"  exactness    max |logit diff| sliced vs group-sparse {s['max_abs_logit_diff']:.2e}")
    sample = result.report.get("sample") or {}
    if sample:
        print(f"  sample       {sample['text'][:160]!r}")
    print_evaluation_tables(result.report)
    for name, path in result.artifacts.items():
        print(f"  {name:<12} {path}")
    return 0


def print_evaluation_tables(report: dict[str, Any], out: Any = None) -> None:
    """Print a report's zero-shot (dense vs final) and speed tables, when it has them."""
    from lorashear.evaluation.tables import speed_table, zeroshot_table

    zs, sp = report.get("zeroshot"), report.get("speed")
    if zs:
        proto = zs["protocol"]
        head = f"lm-eval {proto.get('lm_eval_version', '?')}, 0-shot, limit {proto.get('limit')} per task"
        print(f"\nzero-shot accuracy ({head})", file=out)
        print(zeroshot_table({"dense": zs["dense"], "final": zs["final"]}, zs.get("paired")), file=out)
    if sp:
        proto = sp["protocol"]
        head = f"{proto.get('device')}, {proto.get('dtype')}, prompt {proto.get('prompt_len')} + "
        print(f"\nspeed ({head}{proto.get('new_tokens')} new tokens, median)", file=out)
        print(speed_table({"dense": sp["dense"], "final": sp["final"]}, sp["comparison"]), file=out)


def cmd_inspect(args: argparse.Namespace) -> int:
    import torch

    from lorashear.budget import plan_quotas
    from lorashear.config import LoRAConfig
    from lorashear.graph import discover
    from lorashear.modeling import attach_lora, load_model, model_shape

    path = _model_path(args.model)
    model = load_model(path)
    shape = model_shape(model)
    if args.adapter:
        model = attach_lora(model, LoRAConfig(), adapter=Path(args.adapter))
    else:
        model = attach_lora(model, LoRAConfig(rank=args.lora_rank))
    structures = StructureConfig(
        attention=not args.no_attention,
        mlp=not args.no_mlp,
        hidden=args.hidden or args.hidden_fraction is not None,
        hidden_fraction=args.hidden_fraction,
        attention_unit=args.attention_unit,
        channel_multiple=args.channel_multiple,
    )
    st = discover(model, shape=shape, attention=structures.attention, mlp=structures.mlp, hidden=structures.hidden)
    print(
        f"{path.name}: {shape.model_type}, {shape.num_layers} layers, hidden {shape.hidden_size}, "
        f"{shape.num_heads} heads / {shape.num_kv_heads} KV heads (n_rep {shape.n_rep}), head_dim {shape.head_dim}, "
        f"intermediate {shape.intermediate_size}, {shape.total_params:,} parameters"
    )
    print(f"traced channel spaces: {st.spaces} (LoRA rank spaces are never pruned)\n")
    print(f"{'structure':<16}{'layer':>6}{'groups':>8}{'params/group':>14}  prunable")
    for r in st.summary():
        layer = "all" if r["layer"] is None else r["layer"]
        print(
            f"{r['kind']:<16}{layer:>6}{r['groups']:>8}{r['params_per_group']:>14,}  {'yes' if r['prunable'] else 'no'}"
        )
    print("\nprobe checks:")
    for c in st.checks:
        print(f"  {c}")
    if args.target_ratio is not None:
        q = plan_quotas(shape, args.target_ratio, structures, args.gamma)
        print(
            f"\ntarget {args.target_ratio:.0%} of parameters (gamma {args.gamma}): remove per layer "
            f"{q.kv_groups} {'KV groups' if shape.n_rep > 1 else 'heads'}, {q.query_heads_per_group} query heads "
            f"per KV group, {q.channels} MLP channels; {q.hidden} hidden dims"
        )
        print(f"  kept sizes {q.kept}")
        print(
            f"  parameters {q.params_before:,} -> {q.params_after:,} (target {q.params_target:,}, "
            f"one budget step = {2 * q.tolerance:,})"
        )
    del torch
    return 0


def _positive(name: str, minimum: int = 1):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected an integer, got {text!r}") from None
        if value < minimum or value > 131_072 * 1024:
            raise argparse.ArgumentTypeError(f"{name}: expected an integer >= {minimum}, got {value}")
        return value

    return parse


def _fraction(name: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected a number, got {text!r}") from None
        if not 0 <= value < 1:
            raise argparse.ArgumentTypeError(f"{name}: expected a fraction in [0, 1), got {value}")
        return value

    return parse


def _device(text: str) -> str:
    import re

    if not re.match(r"^(auto|cpu|cuda(:\d+)?)$", text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def _task_list(text: str) -> list[str]:
    from lorashear.config import ZEROSHOT_TASKS

    names = list(ZEROSHOT_TASKS) if text == "all" else [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in ZEROSHOT_TASKS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"--tasks: unknown task {', '.join(bad) or repr(text)}; use 'all' or a comma-separated list of "
            f"{', '.join(ZEROSHOT_TASKS)}"
        )
    return names


def _int_list(name: str):
    def parse(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected comma-separated integers, got {text!r}") from None
        if not values or any(v < 1 for v in values):
            raise argparse.ArgumentTypeError(f"{name}: expected integers >= 1, got {text!r}")
        return values

    return parse


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from lorashear.config import SpeedConfig, ZeroShotConfig
    from lorashear.evaluation.tables import speed_table, zeroshot_table
    from lorashear.modeling import load_model, load_tokenizer, resolve_device, resolve_dtype

    if not (args.data or args.tasks or args.speed):
        raise ConfigError("nothing to do: give --data (perplexity), --tasks (zero-shot) and/or --speed", field="eval")
    if args.threads:
        torch.set_num_threads(args.threads)
    path = _model_path(args.model)
    device = resolve_device(args.device)
    model = load_model(path, device=device, dtype=resolve_dtype(args.dtype, device))
    tok = load_tokenizer(path)
    out: dict[str, Any] = {"model": str(path)}
    if args.data:
        from lorashear.data import TokenStream, read_text
        from lorashear.evaluation import perplexity

        limit = getattr(model.config, "max_position_embeddings", None)
        if limit and args.window > limit:
            raise ConfigError(f"--window {args.window} exceeds the model's context of {limit} tokens", field="window")
        stream = TokenStream.from_text(read_text(Path(args.data), "data"), tok)
        p = perplexity(
            model,
            stream,
            window=args.window,
            stride=args.stride,
            max_windows=args.max_windows,
            batch_size=args.batch_size,
            dataset=str(args.data),
        )
        out["perplexity"] = p.to_dict()
        if not args.json:
            print(
                f"perplexity {p.perplexity:.4f} (nll {p.nll:.4f} nats/token) on {args.data}: window {p.window}, "
                f"stride {p.stride}, {p.windows} windows, {p.tokens:,} tokens scored, tokenizer of {path.name}"
            )
    if args.tasks:
        from lorashear.evaluation.zeroshot import run_zeroshot

        task_dir = Path(args.task_dir).resolve() if args.task_dir else BUNDLED_DATA_ROOT / "zeroshot"
        zcfg = ZeroShotConfig(tasks=args.tasks, limit=args.limit, batch_size=args.zs_batch_size, task_dir=task_dir.name)

        def step(done: int, total: int, score: Any) -> None:
            if not args.json:
                print(f"  [{done}/{total}] {score.label}: acc {score.acc:.4f} (n {score.n})", file=sys.stderr)

        z = run_zeroshot(model, tok, zcfg, data_root=task_dir.parent, on_step=step)
        out["zeroshot"] = z.to_dict()
        if not args.json:
            print(f"\nzero-shot accuracy of {path.name} (task files in {task_dir})")
            print(zeroshot_table({path.name: out["zeroshot"]}))
    if args.speed:
        from lorashear.evaluation.speed import measure_speed

        scfg = SpeedConfig(
            prompt_len=args.prompt_len,
            new_tokens=args.new_tokens,
            batch_sizes=args.speed_batch_sizes,
            repeats=args.repeats,
        )
        sp = measure_speed(model, cfg=scfg)
        out["speed"] = sp.to_dict()
        if not args.json:
            print(f"\nspeed of {path.name} ({sp.params:,} parameters, {sp.flops_decode / 1e6:.1f} MFLOPs/token decode)")
            print(speed_table({path.name: out["speed"]}))
    if args.json:
        print(json.dumps(out))
    return 0


def cmd_spec(args: argparse.Namespace) -> int:
    spec = JobSpec.from_dict({"model": args.model, "target_ratio": args.target_ratio})
    print(spec.to_json())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lorashear", description="LoRAShear structured pruning and knowledge recovery")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run the whole pipeline from a job spec (JSON or YAML)")
    r.add_argument("spec", help="job spec file; see `lorashear spec` for every field with its default")
    r.add_argument("--output", "-o", help="artifact directory (must not exist; default runs/<spec name>)")
    r.add_argument("--work-dir", help="checkpoint directory (default <output>.work); rerun to resume")
    r.add_argument("--model-root", help=f"where spec model names resolve (default {BUNDLED_MODEL_ROOT})")
    r.add_argument("--data-root", help=f"where spec data names resolve (default {BUNDLED_DATA_ROOT})")
    r.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    r.add_argument(
        "--allow-unknown-fields", action="store_true", help="warn about unknown spec fields instead of refusing them"
    )
    r.set_defaults(func=cmd_run)

    docs = field_docs(StructureConfig)
    i = sub.add_parser("inspect", help="print the minimally removable structures and per-type quotas")
    i.add_argument("model", help="model directory, .gguf file, or bundled name (stories260K)")
    i.add_argument("--adapter", help="existing PEFT LoRA adapter directory")
    i.add_argument("--lora-rank", type=_positive("--lora-rank"), default=8)
    i.add_argument(
        "--target-ratio", type=_fraction("--target-ratio"), default=0.2, help="fraction 0-1 of parameters to remove"
    )
    i.add_argument("--gamma", type=_fraction("--gamma"), default=0.1, help="unprunable ratio, fraction 0-1")
    i.add_argument(
        "--attention-unit", default="auto", choices=("auto", "kv_group", "query_head"), help=docs.get("attention_unit")
    )
    i.add_argument(
        "--channel-multiple", type=_positive("--channel-multiple"), default=1, help=docs.get("channel_multiple")
    )
    i.add_argument("--hidden", action="store_true", help=docs.get("hidden"))
    i.add_argument(
        "--hidden-fraction", type=_fraction("--hidden-fraction"), default=None, help=docs.get("hidden_fraction")
    )
    i.add_argument("--no-attention", action="store_true")
    i.add_argument("--no-mlp", action="store_true")
    i.set_defaults(func=cmd_inspect)

    e = sub.add_parser(
        "eval",
        help="perplexity, zero-shot accuracy (lm-eval) and/or measured speed of a model, with their protocols",
        description="Any of: perplexity on a text file (--data), zero-shot accuracy through lm-eval (--tasks), "
        "prefill/decode speed (--speed). MODEL is a model directory (e.g. a job's model/ output), a .gguf file or a "
        "bundled name.",
    )
    e.add_argument("model", help="model directory, .gguf file, or bundled name")
    e.add_argument("--data", default=None, help="perplexity: text file (paragraphs separated by blank lines)")
    e.add_argument("--window", type=_positive("--window", 2), default=128, help="tokens per window")
    e.add_argument(
        "--stride", type=_positive("--stride"), default=None, help="tokens between windows (default: window)"
    )
    e.add_argument("--max-windows", type=_positive("--max-windows"), default=None)
    e.add_argument("--batch-size", type=_positive("--batch-size"), default=8, help="perplexity windows per forward")
    e.add_argument(
        "--tasks",
        type=_task_list,
        default=None,
        help="zero-shot: comma-separated tasks (arc_easy, arc_challenge, boolq, hellaswag, openbookqa, piqa, "
        "winogrande) or 'all'",
    )
    e.add_argument(
        "--limit", type=_positive("--limit"), default=None, help="zero-shot: documents per task (default: all)"
    )
    e.add_argument(
        "--task-dir",
        default=None,
        help="zero-shot: directory of llm-foundry JSON-lines task files (default: the bundled 50-row slices)",
    )
    e.add_argument("--zs-batch-size", type=_positive("--zs-batch-size"), default=16, help="zero-shot batch size")
    e.add_argument("--speed", action="store_true", help="measure prefill and decode tokens/s")
    e.add_argument("--prompt-len", type=_positive("--prompt-len"), default=64, help="speed: prompt tokens")
    e.add_argument("--new-tokens", type=_positive("--new-tokens"), default=32, help="speed: generated tokens")
    e.add_argument("--speed-batch-sizes", type=_int_list("--speed-batch-sizes"), default=[1, 8], help="speed: e.g. 1,8")
    e.add_argument("--repeats", type=_positive("--repeats"), default=5, help="speed: timed repeats (median)")
    e.add_argument("--device", default="auto", type=_device, help="auto, cpu, cuda or cuda:N")
    e.add_argument(
        "--dtype", default="float32", choices=("auto", "float32", "bfloat16", "float16"), help="weights dtype"
    )
    e.add_argument("--threads", type=_positive("--threads"), default=None, help="torch CPU threads")
    e.add_argument("--json", action="store_true", help="print the results as one JSON object")
    e.set_defaults(func=cmd_eval)

    s = sub.add_parser("spec", help="print a full spec with every default filled in")
    s.add_argument("--model", default="stories260K")
    s.add_argument("--target-ratio", type=float, default=0.2)
    s.set_defaults(func=cmd_spec)

    from lorashear.jobs_cli import add_commands as add_job_commands

    add_job_commands(sub)
    add_plugin_commands(sub)
    return p


COMMAND_GROUP = "lorashear.commands"
"""Entry-point group of packages that add sub-commands (the service adds ``serve`` and ``demo``)."""


def add_plugin_commands(sub: Any) -> list[str]:
    """Let installed packages add sub-commands: each entry point of :data:`COMMAND_GROUP` is a callable taking the
    sub-parser set. A plugin whose dependencies are missing (e.g. the service without its extra) is skipped.

    Returns:
        The names of the entry points that loaded.
    """
    from importlib.metadata import entry_points

    loaded = []
    for ep in entry_points(group=COMMAND_GROUP):
        try:
            ep.load()(sub)
        except ImportError:
            continue
        loaded.append(ep.name)
    return loaded


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lorashear`` console script. Exit codes: 0 ok, 2 bad input, 1 internal error, 130
    cancelled."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except Cancelled:
        print("cancelled; rerun the same command to resume from the checkpoint", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\ninterrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    except LoRAShearError as exc:
        where = f" [{exc.field}]" if exc.field else ""
        print(f"error{where}: {exc.message}", file=sys.stderr)
        return 2 if exc.user_error else 1
    except OSError as exc:  # unwritable output, missing file given on the command line
        print(f"error: {exc.strerror or exc}{f' ({exc.filename})' if exc.filename else ''}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug of ours: one line, the traceback only on request
        if os.environ.get("LORASHEAR_DEBUG"):
            raise
        print(f"internal error: {type(exc).__name__}: {exc} (set LORASHEAR_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
