"""Resumable checkpoints: safetensors for tensors, JSON for everything else (never pickle).

A checkpoint directory holds ``state.json`` (stage, counters, LHSPG pruned/active group sets, recovery round and
mix weights, results so far, the spec's hash) and ``tensors.safetensors`` (model parameters, optimizer moments,
RNG states). It is written to a temporary sibling and renamed, so a kill mid-write leaves the previous one intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lorashear.errors import CheckpointError

STATE = "state.json"
TENSORS = "tensors.safetensors"


def spec_hash(spec_json: str) -> str:
    """sha256 of the canonical spec JSON: a checkpoint only resumes the spec that wrote it."""
    return hashlib.sha256(spec_json.encode()).hexdigest()


def flatten_optimizer(prefix: str, state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a torch optimizer ``state_dict`` into tensors and JSON."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for pid, st in state["state"].items():
        entry = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{prefix}.{pid}.{k}"] = v.detach().cpu().contiguous()
                entry[k] = "tensor"
            else:
                entry[k] = v
        meta["state"][str(pid)] = entry
    return tensors, meta


def unflatten_optimizer(prefix: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer`."""
    state: dict[int, dict[str, Any]] = {}
    for pid, entry in meta["state"].items():
        state[int(pid)] = {k: (tensors[f"{prefix}.{pid}.{k}"] if v == "tensor" else v) for k, v in entry.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def save(directory: Path, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Write a checkpoint atomically (temporary sibling + rename)."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / TENSORS))
    (tmp / STATE).write_text(json.dumps(state, default=_json_default))
    old = directory.with_name(directory.name + ".old")
    if directory.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(directory, old)
    os.replace(tmp, directory)
    if old.exists():
        shutil.rmtree(old)


def load(directory: Path, expected_hash: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """Read a checkpoint, or ``None`` when there is none.

    Raises:
        CheckpointError: unreadable files, or a checkpoint written for another spec.
    """
    directory = Path(directory)
    if not (directory / STATE).is_file():
        old = directory.with_name(directory.name + ".old")  # killed between the two renames
        if (old / STATE).is_file():
            directory = old
        else:
            return None
    try:
        state = json.loads((directory / STATE).read_text())
        tensors = load_file(str(directory / TENSORS))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read checkpoint in {directory}: {exc}") from None
    if state.get("spec_hash") != expected_hash:
        raise CheckpointError(
            f"{directory} holds a checkpoint of a different spec; use a fresh work directory or delete it"
        )
    return state, tensors


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, set):
        return sorted(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
