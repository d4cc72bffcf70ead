"""Zero-shot accuracy through lm-eval: equal to stock HFLM, task files checked with the field named, full-file
layout, PEFT models, the CLI. Seconds on the bundled stories260K (its scores sit at chance: these tests check the
mechanism, not the model)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lorashear.config import JobSpec, ZeroShotConfig
from lorashear.errors import ConfigError, DataError
from lorashear.evaluation.tasks import LM_TASK_DIR, TASKS, check_tasks, sha256_file
from lorashear.resolve import BUNDLED_DATA_ROOT, Roots

from .conftest import STORIES

ZS_DIR = BUNDLED_DATA_ROOT / "zeroshot"


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def stories() -> tuple[torch.nn.Module, object]:
    from lorashear.modeling import load_model, load_tokenizer

    return load_model(STORIES), load_tokenizer(STORIES)


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (ZS_DIR / name).read_text().splitlines() if line.strip()]


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_equals_stock_hflm_on_the_bundled_model(stories, tmp_path, monkeypatch) -> None:
    """The product's numbers (in-memory model, our task loading) equal stock lm-eval: ``simple_evaluate`` with the
    ``hf`` model loading the model directory, the shipped YAMLs by name through ``TaskManager(include_path=...)``,
    and lm-eval's own ``json`` dataset loader reading the YAMLs' relative data files from the data root."""
    import datasets
    import lm_eval
    from lm_eval.tasks import TaskManager

    from lorashear.evaluation.zeroshot import run_zeroshot

    tasks = ["arc_easy", "boolq", "piqa", "winogrande"]
    cfg = ZeroShotConfig(tasks=tasks, limit=16, batch_size=8)
    ours = run_zeroshot(stories[0], stories[1], cfg, data_root=BUNDLED_DATA_ROOT)

    monkeypatch.chdir(BUNDLED_DATA_ROOT)  # the YAMLs name zeroshot/<file> relative to the data root
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    stock = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(STORIES), "dtype": "float32", "device": "cpu"},
        tasks=[TASKS[t].lm_eval_name for t in tasks],
        task_manager=TaskManager(include_path=str(LM_TASK_DIR), include_defaults=False),
        limit=16,
        batch_size=8,
        log_samples=True,
    )
    assert stock is not None
    for t in tasks:
        row = stock["results"][TASKS[t].lm_eval_name]
        mine = ours.tasks[t]
        assert mine.n == stock["n-samples"][TASKS[t].lm_eval_name]["effective"] == 16
        logged = sorted(stock["samples"][TASKS[t].lm_eval_name], key=lambda x: x["doc_id"])
        assert mine.outcomes == "".join(str(int(x[mine.headline])) for x in logged), t  # per document, in order
        assert mine.acc == row["acc,none"], t
        assert mine.acc_stderr == pytest.approx(row["acc_stderr,none"]), t
        if "acc_norm" in TASKS[t].metrics:
            assert mine.acc_norm == row["acc_norm,none"], t
        else:
            assert mine.acc_norm is None and "acc_norm,none" not in row
    assert ours.avg == pytest.approx(sum(ours.tasks[t].score for t in tasks) / len(tasks))
    assert ours.avg5 is None  # ARC-c and OBQA were not scored
    p = ours.protocol
    assert p["lm_eval_version"] == lm_eval.__version__ and p["num_fewshot"] == 0 and p["limit"] == 16
    assert p["tasks"]["piqa"]["file"] == "zeroshot/piqa.jsonl"
    assert p["tasks"]["piqa"]["sha256"] == sha256_file(ZS_DIR / "piqa.jsonl")
    assert p["dtype"] == "float32" and p["device"] == "cpu" and p["threads"] == 1
    json.dumps(ours.to_dict())  # JSON-ready


def test_peft_wrapped_model_scores_like_the_plain_model(stories) -> None:
    """HFLM takes the PEFT model of a running job; a fresh LoRA (B = 0) changes nothing; the mode is restored."""
    from lorashear.config import LoRAConfig
    from lorashear.evaluation.zeroshot import run_zeroshot, zeroshot_metrics, zeroshot_section
    from lorashear.modeling import attach_lora, load_model

    cfg = ZeroShotConfig(tasks=["piqa", "openbookqa"], limit=8, batch_size=4)
    plain = run_zeroshot(stories[0], stories[1], cfg, data_root=BUNDLED_DATA_ROOT)
    peft = attach_lora(load_model(STORIES), LoRAConfig(rank=4))
    peft.train()
    seen: list[tuple[int, int, str]] = []
    wrapped = run_zeroshot(
        peft, stories[1], cfg, data_root=BUNDLED_DATA_ROOT, on_step=lambda d, n, s: seen.append((d, n, s.task))
    )
    assert peft.training
    assert seen == [(1, 2, "piqa"), (2, 2, "openbookqa")]
    for t in cfg.tasks:
        assert wrapped.tasks[t].acc == plain.tasks[t].acc and wrapped.tasks[t].acc_norm == plain.tasks[t].acc_norm

    section = zeroshot_section(plain, wrapped)  # the report's shape: dense, final, delta, shared protocol
    assert section["delta"] == {"piqa": 0.0, "openbookqa": 0.0} and section["avg_delta"] == 0.0
    assert section["paired"]["avg"] == 0.0 and section["paired"]["avg_se"] == 0.0  # the same answers, doc by doc
    assert section["paired"]["tasks"]["piqa"] == {"change": 0.0, "se": 0.0, "n": 8, "gained": 0, "lost": 0}
    assert section["protocol"]["limit"] == 8 and "seconds" not in section["protocol"]
    json.dumps(section)
    metrics = zeroshot_metrics(wrapped, "zeroshot/final")
    assert metrics["zeroshot/final/piqa/acc"] == wrapped.tasks["piqa"].acc and "zeroshot/final/avg" in metrics
    other = run_zeroshot(stories[0], stories[1], ZeroShotConfig(tasks=["piqa"], limit=2), data_root=BUNDLED_DATA_ROOT)
    with pytest.raises(ValueError, match="same settings"):
        zeroshot_section(plain, other)


def test_task_definitions_read_the_full_file_layout(stories, tmp_path) -> None:
    """A user's own task directory with full-size files (more rows than the bundled slices), no limit, plus a
    per-task file override."""
    from lorashear.evaluation.zeroshot import run_zeroshot

    root = tmp_path / "data"
    piqa = _rows("piqa.jsonl")
    full = [dict(r, query=f"{r['query'].rstrip()} ({i})\n") for i, r in enumerate(piqa * 3)]  # 150 rows
    _write(root / "foundry" / "piqa.jsonl", full)
    _write(root / "foundry" / "hellaswag_small.jsonl", _rows("hellaswag.jsonl") * 3)  # 12 rows
    cfg = ZeroShotConfig(
        tasks=["piqa", "hellaswag"],
        limit=None,
        batch_size=16,
        task_dir="foundry",
        files={"hellaswag": "foundry/hellaswag_small.jsonl"},
    )
    assert set(check_tasks(cfg, root)) == {"piqa", "hellaswag"}
    res = run_zeroshot(stories[0], stories[1], cfg, data_root=root)
    assert res.tasks["piqa"].n == 150 and res.tasks["hellaswag"].n == 12
    assert 0.0 <= res.tasks["piqa"].acc <= 1.0 and res.tasks["hellaswag"].acc_norm is not None
    files = res.protocol["tasks"]
    assert files["piqa"] == {
        "file": "foundry/piqa.jsonl",
        "sha256": sha256_file(root / "foundry" / "piqa.jsonl"),
        "lines": 150,
        "lm_eval_task": "lorashear_piqa",
        "yaml_sha256": sha256_file(TASKS["piqa"].yaml_path),
    }
    assert files["hellaswag"]["file"] == "foundry/hellaswag_small.jsonl" and res.protocol["limit"] is None


def _bad_root(tmp_path: Path, name: str, text: str) -> Path:
    root = tmp_path / "data"
    (root / "zeroshot").mkdir(parents=True)
    for f in ("arc_easy.jsonl", "piqa.jsonl", "winogrande.jsonl"):
        (root / "zeroshot" / f).write_text((ZS_DIR / f).read_text())
    (root / "zeroshot" / name).write_text(text)
    return root


WINO = json.dumps({"context_options": ["a", "b"], "continuation": "c", "gold": 0}) + "\n"
MC = json.dumps({"query": "q", "choices": ["a", "b"], "gold": 1}) + "\n"


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("piqa.jsonl", WINO, "missing key 'query'"),  # a WinoGrande file where PIQA is expected
        ("winogrande.jsonl", MC, "missing key 'continuation'"),
        ("piqa.jsonl", MC.replace('"gold": 1', '"gold": 2'), "'gold' must be an integer index"),
        ("piqa.jsonl", MC.replace('["a", "b"]', '["a"]'), "at least two strings"),
        ("piqa.jsonl", MC + "{not json\n", "line 2: malformed JSON"),
        ("piqa.jsonl", "", "is empty"),
        ("piqa.jsonl", "[1, 2]\n", "expected a JSON object"),
    ],
)
def test_wrong_layout_is_refused_naming_the_field(tmp_path, name, text, message) -> None:
    root = _bad_root(tmp_path, name, text)
    cfg = ZeroShotConfig(tasks=["arc_easy", "piqa", "winogrande"])
    with pytest.raises(DataError) as exc:
        check_tasks(cfg, root)
    assert exc.value.field == "evaluation.zeroshot.task_dir"
    assert message in str(exc.value)


def test_missing_files_and_unknown_names_are_refused_naming_the_field(tmp_path) -> None:
    with pytest.raises(ConfigError) as exc:
        JobSpec.from_dict({"model": "stories260K", "evaluation": {"zeroshot": {"tasks": ["piqa", "mmlu"]}}})
    assert exc.value.field == "evaluation.zeroshot.tasks[1]"
    with pytest.raises(ConfigError) as exc:
        JobSpec.from_dict({"model": "stories260K", "evaluation": {"zeroshot": {"files": {"lambada": "x.jsonl"}}}})
    assert exc.value.field == "evaluation.zeroshot.files.lambada"
    with pytest.raises(ConfigError) as exc:
        JobSpec.from_dict({"model": "stories260K", "evaluation": {"zeroshot": {"task_dir": "../elsewhere"}}})
    assert exc.value.field == "evaluation.zeroshot.task_dir"

    cfg = ZeroShotConfig(tasks=["piqa"])
    cfg.tasks.append("mmlu")  # an in-memory config that skipped validation
    with pytest.raises(ConfigError) as exc:
        check_tasks(cfg, BUNDLED_DATA_ROOT)
    assert exc.value.field == "evaluation.zeroshot.tasks[1]"
    with pytest.raises(DataError) as exc:  # the bundled slices hold no file of that name
        check_tasks(ZeroShotConfig(tasks=["piqa"], task_dir="tinystories"), BUNDLED_DATA_ROOT)
    assert exc.value.field == "evaluation.zeroshot.task_dir" and "'tinystories/piqa.jsonl'" in str(exc.value)
    with pytest.raises(DataError) as exc:
        check_tasks(ZeroShotConfig(tasks=["hellaswag"], files={"hellaswag": "zeroshot/nope.jsonl"}), BUNDLED_DATA_ROOT)
    assert exc.value.field == "evaluation.zeroshot.files.hellaswag"


def test_preflight_refuses_bad_task_files_and_skips_disabled_zeroshot(tmp_path) -> None:
    from lorashear.preflight import preflight

    spec = JobSpec.from_dict({"model": "stories260K", "evaluation": {"zeroshot": {"task_dir": "nope"}}})
    with pytest.raises(DataError) as exc:
        preflight(spec, Roots())
    assert exc.value.field == "evaluation.zeroshot.task_dir"
    off = JobSpec.from_dict(
        {"model": "stories260K", "evaluation": {"zeroshot": {"task_dir": "nope", "enabled": False}}}
    )
    preflight(off, Roots())
    preflight(JobSpec.from_dict({"model": "stories260K"}), Roots())  # the defaults name the bundled slices


def test_spec_sections_round_trip() -> None:
    data = {
        "model": "stories260K",
        "evaluation": {
            "zeroshot": {"tasks": ["piqa", "hellaswag"], "limit": None, "files": {"hellaswag": "zs/h.jsonl"}},
            "speed": {"prompt_len": 16, "new_tokens": 4, "batch_sizes": [1, 2], "repeats": 2},
        },
    }
    spec = JobSpec.from_dict(data)
    again = JobSpec.from_json(spec.to_json())
    assert again.to_dict() == spec.to_dict()
    assert again.evaluation.zeroshot.limit is None and again.evaluation.speed.batch_sizes == [1, 2]
    default = JobSpec.from_dict({"model": "stories260K"}).evaluation
    assert default.zeroshot.enabled and "hellaswag" not in default.zeroshot.tasks  # only a 4-row sample is bundled
    assert all((ZS_DIR / TASKS[t].file).is_file() for t in TASKS)


def test_cli_eval_prints_tasks_and_speed(capsys) -> None:
    from lorashear.cli import main

    argv = ["eval", "stories260K", "--tasks", "piqa,winogrande", "--limit", "4", "--speed", "--threads", "1"]
    argv += ["--prompt-len", "8", "--new-tokens", "2", "--speed-batch-sizes", "1,2", "--repeats", "1"]
    assert main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["zeroshot"]["tasks"]) == {"piqa", "winogrande"}
    assert out["zeroshot"]["tasks"]["piqa"]["n"] == 4
    assert [r["batch"] for r in out["speed"]["rows"]] == [1, 2]
    assert all(math.isfinite(r["decode_tokens_per_s"]) for r in out["speed"]["rows"])
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "PIQA" in text and "WinoGrande" in text and "decode" in text and "lm-eval 0.4." in text
    assert main(["eval", "stories260K"]) == 2  # nothing asked for
    assert "nothing to do" in capsys.readouterr().err


def _stock_doc(task: str, row: dict) -> dict:
    """The Hugging Face dataset row that lm-eval's stock task reads, rebuilt from an llm-foundry line."""
    labels = list("ABCDE")
    if task in ("arc_easy", "openbookqa"):
        key = {"text": row["choices"], "label": labels[: len(row["choices"])]}
        if task == "arc_easy":
            return {
                "question": row["query"].removeprefix("Question: "),
                "choices": key,
                "answerKey": labels[row["gold"]],
            }
        return {"question_stem": row["query"], "choices": key, "answerKey": labels[row["gold"]]}
    if task == "piqa":
        goal = row["query"].removeprefix("Question: ").rstrip("\n")
        return {"goal": goal, "sol1": row["choices"][0], "sol2": row["choices"][1], "label": row["gold"]}
    if task == "boolq":
        passage, question = row["query"].removeprefix("Passage: ").split("\nQuestion: ", 1)
        return {"passage": passage, "question": question.removesuffix("?"), "label": row["gold"]}
    assert task == "winogrande"
    a, b = row["context_options"]
    n = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    return {
        "sentence": a[:n] + "_ " + row["continuation"],
        "option1": a[n:],
        "option2": b[n:],
        "answer": str(row["gold"] + 1),
    }


STOCK_YAML = {
    "arc_easy": "arc/arc_easy.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
    "piqa": "piqa/piqa.yaml",
    "winogrande": "winogrande/default.yaml",
}


@pytest.mark.parametrize("task", sorted(STOCK_YAML))
def test_requests_are_those_of_the_stock_lm_eval_task(task) -> None:
    """The shipped YAML over the llm-foundry file builds exactly the (context, continuation) pairs that lm-eval's
    stock task of the same name builds from the original dataset row (prompt, choices, target delimiter)."""
    import ast

    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml
    from lm_eval.utils import apply_template

    from lorashear.evaluation.zeroshot import task_config, task_manager

    rows = _rows(TASKS[task].file)[:5]
    ours = task_manager().load([task_config(task, docs=rows)])["tasks"][TASKS[task].lm_eval_name]
    ours.build_all_requests(limit=5, rank=0, world_size=1)
    got: dict[int, list[tuple[str, str]]] = {}
    for inst in ours.instances:
        got.setdefault(inst.doc_id, []).append(tuple(inst.arguments))

    stock = load_yaml(Path(lm_eval.tasks.__file__).parent / STOCK_YAML[task], resolve_func=True)

    def render(key: str, doc: dict):
        value = stock[key]
        if callable(value):
            return value(doc)
        if isinstance(value, list):
            return value
        if value in doc:
            return doc[value]
        text = apply_template(value, doc)
        return ast.literal_eval(text) if key == "doc_to_choice" else text

    for i, row in enumerate(rows):
        doc = _stock_doc(task, row)
        ctx, choices = render("doc_to_text", doc), render("doc_to_choice", doc)
        if isinstance(ctx, int):  # WinoGrande: one context per option, the same continuation
            want = [(c, " " + render("doc_to_target", doc)) for c in choices]
        else:
            want = [(ctx, " " + c) for c in choices]
        assert got[i] == want, (task, i)


def test_cli_eval_on_a_saved_model_directory_and_a_task_dir(tmp_path, capsys) -> None:
    """A job's ``model/`` output is a Hugging Face directory with narrower widths than any stock config."""
    from lorashear.cli import main

    from .conftest import CASES, save_model

    model_dir = save_model(CASES[1], tmp_path / "job", "model")
    _write(tmp_path / "tasks" / "arc_challenge.jsonl", _rows("arc_challenge.jsonl")[:6])
    argv = ["eval", str(model_dir), "--tasks", "arc_challenge", "--task-dir", str(tmp_path / "tasks"), "--json"]
    assert main([*argv, "--threads", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    row = out["zeroshot"]["tasks"]["arc_challenge"]
    assert row["n"] == 6
    assert out["zeroshot"]["protocol"]["tasks"]["arc_challenge"]["file"] == "tasks/arc_challenge.jsonl"


def test_paired_change_counts_documents_and_its_error_is_the_paired_one() -> None:
    """The paired change of two models on the same documents: gained / lost counts, the mean difference, and the
    standard error of the per-document differences (hand-computed), which is below the unpaired one when the
    models agree on most documents; results without outcomes (recorded before they were kept) give None."""
    from lorashear.evaluation.zeroshot import TaskScore, ZeroShotResult, paired_change, paired_section

    before, after = "1100110011" * 2, "1100110010" * 2  # 20 documents; `after` loses 2 of them
    c = paired_change(before, after)
    assert (c["n"], c["gained"], c["lost"]) == (20, 0, 2) and c["change"] == pytest.approx(-0.1)
    d = [-1 if i % 10 == 9 else 0 for i in range(20)]
    var = sum((x + 0.1) ** 2 for x in d) / 19
    assert c["se"] == pytest.approx(math.sqrt(var / 20))
    p1, p2 = before.count("1") / 20, after.count("1") / 20
    assert c["se"] < math.sqrt(p1 * (1 - p1) / 20 + p2 * (1 - p2) / 20)  # agreeing models: a tighter error
    for bad in (("", ""), ("01", "011"), ("01", "0x")):
        with pytest.raises(ValueError, match="0/1"):
            paired_change(*bad)

    def result(outcomes: dict[str, str]) -> ZeroShotResult:
        tasks = {
            t: TaskScore(t, t, o.count("1") / max(len(o), 1), None, None, None, len(o), "acc", o)
            for t, o in outcomes.items()
        }
        return ZeroShotResult(tasks, 0.0, 0.0, None)

    names = ["arc_easy", "arc_challenge", "openbookqa", "piqa", "winogrande"]
    sec = paired_section(result(dict.fromkeys(names, before)), result(dict.fromkeys(names, after)))
    assert sec is not None and sec["avg5"] == pytest.approx(-0.1)
    assert sec["avg5_se"] == pytest.approx(math.sqrt(5 * c["se"] ** 2) / 5)  # five independent tasks
    assert paired_section(result({"piqa": before}), result({"piqa": ""})) is None
    assert paired_section(result({"piqa": before}), result({"piqa": before[:10]})) is None
    assert paired_section(result({"piqa": before}), result({"piqa": after}))["avg5"] is None
    old = ZeroShotResult.from_dict(  # a checkpoint written before outcomes were kept still loads
        {
            "tasks": {
                "piqa": {k: v for k, v in result({"piqa": before}).tasks["piqa"].to_dict().items() if k != "outcomes"}
            },
            "avg": 0.0,
            "avg_acc": 0.0,
            "avg5": None,
        }
    )
    assert old.tasks["piqa"].outcomes == ""
