"""Where names in a spec point: the model root and the data root (standard library only).

Specs name models, adapters and data files relative to configured roots; they never carry filesystem paths
(DEVELOPERS.md, security basics). The defaults are the assets bundled with the package (stories260K and the
TinyStories slices); ``LORASHEAR_MODEL_ROOT`` / ``LORASHEAR_DATA_ROOT`` or the CLI's ``--model-root`` /
``--data-root`` point elsewhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lorashear.config import check_name
from lorashear.errors import ConfigError, DataError

ASSETS = Path(__file__).resolve().parent / "assets"
BUNDLED_MODEL_ROOT = ASSETS / "models"
BUNDLED_DATA_ROOT = ASSETS / "data"


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
        except (OSError, RuntimeError) as exc:  # e.g. a symlink loop
            raise ConfigError(f"{field}: {name!r} cannot be resolved: {exc}", field=field) from None
        if path != root and root not in path.parents:  # a symlink pointing out of the root
            raise ConfigError(f"{field}: {name!r} resolves outside the configured root", field=field)
        return path

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
