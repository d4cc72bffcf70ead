"""Exception hierarchy of the library (standard library only).

Every error the library raises on purpose derives from :class:`LoRAShearError` and also from the builtin that
fits, so callers can catch either. :attr:`LoRAShearError.user_error` separates a problem with the caller's input
(a bad spec, an unsupported model, a mismatched adapter) from a failure of ours; the service maps it to the job's
error code.
"""

from __future__ import annotations


class LoRAShearError(Exception):
    """Root of the library's exceptions.

    Attributes:
        field: dotted path of the spec field at fault (e.g. ``"lora.rank"``), or ``None``.
        user_error: ``True`` when the caller's input is at fault, ``False`` for an internal failure.
        code: short machine-readable cause (``"diverged"``); ``None`` lets the service derive one from the class.
    """

    user_error = False
    code: str | None = None

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class ConfigError(LoRAShearError, ValueError):
    """A job spec or config value is invalid; ``field`` names it."""

    user_error = True


class UnsupportedModelError(LoRAShearError, ValueError):
    """The model's architecture or shape cannot be pruned by this library (e.g. an unknown ``model_type``)."""

    user_error = True


class ModelFileError(UnsupportedModelError):
    """A model's files are broken or disagree with its ``config.json`` (truncated or malformed safetensors, a
    missing tensor, a shape or vocabulary that does not match): the user's files, so a user error; the message
    names the file and the tensor."""

    user_error = True


class TargetNotExpressibleError(LoRAShearError, ValueError):
    """The pruning target cannot be reached with the structures and constraints given (e.g. GQA divisibility)."""

    user_error = True


class AdapterMismatchError(LoRAShearError, ValueError):
    """A PEFT LoRA adapter does not match the base model it is loaded onto (module names or tensor shapes)."""

    user_error = True


class DataError(LoRAShearError, ValueError):
    """A data file is missing, empty or malformed."""

    user_error = True


class NoPrunableGroupsError(LoRAShearError, ValueError):
    """Structure discovery found nothing that may be pruned."""

    user_error = True


class NumericalError(LoRAShearError, RuntimeError):
    """Training produced a non-finite loss or gradient (e.g. fp16 overflow); the message carries a diagnostic."""


class DivergedError(LoRAShearError, RuntimeError):
    """Training diverged: non-finite loss, gradients or weights, or a model whose output carries no information
    (constant logits, worse than a uniform guess). A user error: the learning rate (``field``) is the usual cause
    (issue 7). The message names the stage and step and gives a hint."""

    user_error = True
    code = "diverged"


class ExactnessError(LoRAShearError, RuntimeError):
    """The sliced model's logits differ from the group-sparse model's beyond tolerance (a bug, never user input)."""


class CheckpointError(LoRAShearError, RuntimeError):
    """A checkpoint cannot be read or does not belong to this job."""


class Cancelled(LoRAShearError):
    """The run was cancelled through the ``should_cancel`` hook; the last checkpoint remains usable."""
