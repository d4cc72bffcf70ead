"""Where names in a spec point: the model root and the data root (standard library only).

Specs name models, adapters and data files relative to configured roots; they never carry filesystem paths
(DEVELOPERS.md, security basics). The defaults are the assets bundled with the package (stories260K and the
TinyStories slices); ``LORASHEAR_MODEL_ROOT`` / ``LORASHEAR_DATA_ROOT`` or the CLI's ``--model-root`` /
``--data-root`` point elsewhere.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lorashear.config import check_name
from lorashear.errors import ConfigError, DataError

ASSETS = Path(__file__).resolve().parent / "assets"
BUNDLED_MODEL_ROOT = ASSETS / "models"
BUNDLED_DATA_ROOT = ASSETS / "data"
DATA_SUFFIXES = (".txt", ".jsonl", ".json", ".raw", ".tokens")
"""File endings :meth:`Roots.list_data` reports (what the data loaders read)."""
MAX_LISTED = 2000
"""Most entries :meth:`Roots.list_models` and :meth:`Roots.list_data` return (a huge root is cut, not walked)."""


@dataclass(frozen=True)
class Entry:
    """A name a spec may use, found under a root.

    Attributes:
        name: the name to put in the spec (relative to the root, ``/``-separated).
        kind: ``model`` (directory with config.json), ``gguf`` (a .gguf file), ``adapter`` (a PEFT adapter
            directory) or ``data`` (a data file).
        size: bytes on disk (sum over a directory's files).
        model_type: the config's ``model_type`` for a model directory, else ``None``.
    """

    name: str
    kind: str
    size: int
    model_type: str | None = None


@dataclass(frozen=True)
class Roots:
    """The two directories that spec names resolve under.

    Attributes:
        model_root: directory holding model directories, ``.gguf`` files and PEFT adapter directories.
        data_root: directory holding text and JSON-lines data files.
    """

    model_root: Path = BUNDLED_MODEL_ROOT
    data_root: Path = BUNDLED_DATA_ROOT

    @classmethod
    def from_env(cls) -> Roots:
        """Roots from ``LORASHEAR_MODEL_ROOT`` / ``LORASHEAR_DATA_ROOT``, defaulting to the bundled assets."""
        return cls(
            Path(os.environ.get("LORASHEAR_MODEL_ROOT") or BUNDLED_MODEL_ROOT),
            Path(os.environ.get("LORASHEAR_DATA_ROOT") or BUNDLED_DATA_ROOT),
        )

    def _inside(self, root: Path, name: str, field: str) -> Path:
        check_name(field, name)
        root = root.resolve()
        try:
            path = (root / name).resolve()
        except (OSError, RuntimeError):  # e.g. a symlink loop; the message names no server path
            raise ConfigError(f"{field}: {name!r} cannot be resolved (a symlink loop?)", field=field) from None
        if path != root and root not in path.parents:  # a symlink pointing out of the root
            raise ConfigError(f"{field}: {name!r} resolves outside the configured root", field=field)
        return path

    def list_models(self, max_depth: int = 3) -> list[Entry]:
        """Models, GGUF files and PEFT adapters a spec may name, sorted by name (at most :data:`MAX_LISTED`;
        hidden entries and anything resolving outside the root are skipped)."""
        out = []
        for path, rel in _walk(self.model_root.resolve(), max_depth):
            if not _usable(rel):
                continue
            if path.is_dir() and (path / "config.json").is_file():
                model_type = _model_type(path / "config.json")
                if model_type is not None:  # an unreadable config.json is no model a job could load
                    out.append(Entry(rel, "model", _tree_size(path), model_type))
            elif path.is_dir() and (path / "adapter_config.json").is_file():
                out.append(Entry(rel, "adapter", _tree_size(path)))
            elif path.is_file() and path.suffix == ".gguf":
                out.append(Entry(rel, "gguf", path.stat().st_size))
            if len(out) >= MAX_LISTED:
                break
        return sorted(out, key=lambda e: e.name)

    def list_data(self, max_depth: int = 3) -> list[Entry]:
        """Data files a spec may name (:data:`DATA_SUFFIXES`), sorted by name (at most :data:`MAX_LISTED`)."""
        out = []
        for path, rel in _walk(self.data_root.resolve(), max_depth):
            if _usable(rel) and path.is_file() and path.suffix in DATA_SUFFIXES and path.stat().st_size > 0:
                out.append(Entry(rel, "data", path.stat().st_size))
                if len(out) >= MAX_LISTED:
                    break
        return sorted(out, key=lambda e: e.name)

    def model(self, name: str, field: str = "model") -> Path:
        """Path of a model: a directory with ``config.json`` or a ``.gguf`` file.

        Raises:
            ConfigError: the name is invalid or nothing by that name exists under the model root.
        """
        path = self._inside(self.model_root, name, field)
        if path.is_dir() and (path / "config.json").is_file():
            return path
        if path.is_file() and path.suffix == ".gguf":
            return path
        raise ConfigError(
            f"{field}: no model named {name!r} under the model root (a directory with config.json or a .gguf file)",
            field=field,
        )

    def adapter(self, name: str, field: str = "adapter") -> Path:
        """Path of a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).

        Raises:
            ConfigError: invalid name, missing directory, or missing files.
        """
        path = self._inside(self.model_root, name, field)
        if not (path / "adapter_config.json").is_file():
            raise ConfigError(f"{field}: no PEFT adapter named {name!r} (adapter_config.json missing)", field=field)
        if not (path / "adapter_model.safetensors").is_file():
            raise ConfigError(
                f"{field}: adapter {name!r} has no adapter_model.safetensors (only safetensors adapters load)",
                field=field,
            )
        return path

    def data(self, name: str, field: str) -> Path:
        """Path of a data file under the data root.

        Raises:
            DataError: the file does not exist or is empty.
            ConfigError: invalid name.
        """
        path = self._inside(self.data_root, name, field)
        if not path.is_file():
            raise DataError(f"{field}: no data file named {name!r} under the data root", field=field)
        if path.stat().st_size == 0:
            raise DataError(f"{field}: data file {name!r} is empty", field=field)
        return path


def _walk(root: Path, max_depth: int) -> Iterator[tuple[Path, str]]:
    """``(path, name relative to root)`` of entries under ``root`` down to ``max_depth`` levels, breadth first;
    hidden names and symlinks leading outside the root are skipped; a model or adapter directory is not entered."""
    if not root.is_dir():
        return
    level = [root]
    for _ in range(max_depth):
        nxt = []
        for d in level:
            try:
                children = sorted(d.iterdir())
            except OSError:
                continue
            for child in children:
                if child.name.startswith("."):
                    continue
                try:
                    real = child.resolve()
                except (OSError, RuntimeError):
                    continue
                if root not in real.parents:
                    continue
                yield child, child.relative_to(root).as_posix()
                if child.is_dir() and not (child / "config.json").is_file():
                    if not (child / "adapter_config.json").is_file():
                        nxt.append(child)
        level = nxt


def _usable(name: str) -> bool:
    """Whether a spec may name ``name`` (:func:`lorashear.config.check_name`): the catalog lists only those."""
    try:
        check_name("name", name)
    except ConfigError:
        return False
    return True


def _tree_size(path: Path) -> int:
    total = 0
    for f in path.rglob("*"):
        try:
            if f.is_file() and not f.is_symlink():
                total += f.stat().st_size
        except OSError:
            continue
    return total


def _model_type(config: Path) -> str | None:
    try:
        value = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return str(value) if isinstance(value, str) and value else None
