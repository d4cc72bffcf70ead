"""Rebuild the bundled TinyStories slices in ``lorashear/assets/data/tinystories/``.

Usage: ``python scripts/make_tinystories_splits.py ../shared/assets/data/tinystories/tinystories_val.txt``

The source holds about 4300 paragraphs of the TinyStories validation split (CDLA-Sharing-1.0), separated by
blank lines, stories contiguous. Slices are contiguous and disjoint, in file order, so that no story is split
between a training slice and the evaluation slice:

* paragraphs [0%, 50%): recovery training, split into two sub-datasets by content: ``dialogue`` (paragraphs that
  quote speech) and ``narrative`` (the rest); the instruction data is derived from this slice only;
* [50%, 60%): recovery validation (same two sub-datasets);
* [60%, 70%): calibration (knowledge-distribution analysis);
* [70%, 100%): evaluation (perplexity); never used for training.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "lorashear" / "assets" / "data" / "tinystories"
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def main(source: str) -> None:
    paras = [p.strip() for p in Path(source).read_text().split("\n\n") if p.strip()]
    n = len(paras)

    def cut(a: float, b: float) -> list[str]:
        return paras[int(a * n) : int(b * n)]

    train, valid, calib, evaluation = cut(0, 0.5), cut(0.5, 0.6), cut(0.6, 0.7), cut(0.7, 1.0)

    def is_dialogue(p: str) -> bool:
        return '"' in p

    def write(name: str, ps: list[str]) -> None:
        (OUT / name).write_text("\n\n".join(ps) + "\n")

    write("train_dialogue.txt", [p for p in train if is_dialogue(p)])
    write("train_narrative.txt", [p for p in train if not is_dialogue(p)])
    write("valid_dialogue.txt", [p for p in valid if is_dialogue(p)])
    write("valid_narrative.txt", [p for p in valid if not is_dialogue(p)])
    write("calibration.txt", calib)
    write("eval.txt", evaluation)

    cont, end = [], []
    for i, p in enumerate(train):
        s = [x for x in SENTENCE_END.split(p) if x]
        if len(s) < 3:
            continue
        if i % 2 == 0:
            cont.append({"instruction": "Continue the story.", "input": s[0], "output": " ".join(s[1:])})
        else:
            end.append(
                {"instruction": "Write the last sentence of the story.", "input": " ".join(s[:-1]), "output": s[-1]}
            )
    for name, rows in (("instruct_continue.jsonl", cont), ("instruct_ending.jsonl", end)):
        (OUT / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main(sys.argv[1])
