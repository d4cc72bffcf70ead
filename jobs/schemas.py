"""Pydantic models of the HTTP API: request bodies and the JSON objects it returns."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from jobs.states import JobStatus
from lorashear import config

SECTIONS: dict[str, type] = {
    "lora": config.LoRAConfig,
    "structures": config.StructureConfig,
    "analysis": config.AnalysisConfig,
    "lhspg": config.LHSPGConfig,
    "recovery": config.RecoveryConfig,
    "data": config.DataConfig,
    "evaluation": config.EvaluationConfig,
    "export": config.ExportConfig,
    "runtime": config.RuntimeConfig,
}
"""The spec sections and the config dataclass each one builds."""


EXAMPLE_SPEC: dict[str, Any] = {
    "model": "stories260K",
    "target_ratio": 0.2,
    "lhspg": {"warmup_steps": 2, "periods": 2, "period_steps": 3, "batch_size": 4, "seq_len": 64},
    "recovery": {"rounds": 1, "steps_per_round": 3, "batch_size": 4, "seq_len": 64},
}


def _spec_schema(schema: dict[str, Any]) -> None:
    """Document each spec section in OpenAPI with the schema generated from its config dataclass (each field's
    type, default, bounds and docstring; :func:`lorashear.config.section_schema`). At run time a section stays a
    plain object: the library validates it and names the field at fault (issue 8)."""
    schema["examples"] = [EXAMPLE_SPEC]
    top = config.section_schema(config.JobSpec)["properties"]
    for name in ("model", "target_ratio", "adapter", "seed", "version"):
        generated = dict(top[name])
        if name == "seed":
            generated.update(minimum=0, maximum=2**32 - 1)
        if name == "target_ratio":
            generated["maximum"] = 0.9  # JobSpec.validate: more than 90% is refused
            generated.pop("exclusiveMaximum", None)
        if name == "model":
            generated.pop("default", None)
        schema["properties"][name] = generated
    for name, cls in SECTIONS.items():
        generated = config.section_schema(cls)
        schema["properties"][name] = {
            "anyOf": [generated, {"type": "null"}],
            "title": generated["title"],
            "description": generated["description"],
        }


class JobSpecIn(BaseModel):
    """Body of ``POST /v1/jobs``: a LoRAShear job spec (the same JSON ``lorashear run SPEC`` reads).

    Only the top-level shape is checked here; :meth:`lorashear.config.JobSpec.from_dict` validates every section
    and names the field at fault. Unknown keys are accepted with a warning on the job.
    """

    model_config = ConfigDict(extra="allow", json_schema_extra=_spec_schema)

    model: str = Field(description="Model name under the model root (never a path), e.g. 'stories260K'.")
    target_ratio: float | None = Field(None, description="Fraction of parameters to remove, in (0, 0.9].")
    adapter: str | None = Field(None, description="Existing PEFT LoRA adapter name under the model root.")
    seed: int | None = None
    version: int | None = None
    lora: dict[str, Any] | None = None
    structures: dict[str, Any] | None = None
    analysis: dict[str, Any] | None = None
    lhspg: dict[str, Any] | None = None
    recovery: dict[str, Any] | None = None
    data: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None
    export: dict[str, Any] | None = None
    runtime: dict[str, Any] | None = None


class ErrorBody(BaseModel):
    """The one error shape of the API."""

    code: str
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    """``{"error": {...}}``."""

    error: ErrorBody


class JobError(BaseModel):
    """Why a job failed: ``code`` is ``user_error`` or ``platform_error``; ``type`` the specific cause."""

    code: str
    type: str | None = None
    message: str
    field: str | None = None


class Progress(BaseModel):
    """Where the job is: steps of the current stage and the overall fraction 0-1."""

    step: int
    total: int
    fraction: float


class ArtifactOut(BaseModel):
    """A downloadable output of a finished job."""

    object: Literal["artifact"] = "artifact"
    id: str
    job_id: str
    name: str = Field(description="model, plan, report, plots (report.png), adapter or pruned_base.")
    kind: Literal["file", "directory"]
    size: int = Field(description="Bytes (sum over files for a directory).")
    sha256: str = Field(description="Digest of the file; of the manifest for a directory.")
    files: list[dict[str, Any]] | None = Field(None, description="Directory manifest: path, size, sha256.")
    created_at: datetime
    download_url: str


class JobOut(BaseModel):
    """A job as the API returns it."""

    object: Literal["job"] = "job"
    id: str
    status: JobStatus
    stage: str | None
    progress: Progress
    spec: dict[str, Any]
    warnings: list[str]
    attempt: int
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: JobError | None
    summary: dict[str, Any] | None = Field(
        None,
        description="params_before, params_after, params_target, compression_ratio, ppl_dense, ppl_pruned, "
        "ppl_recovered, max_abs_logit_diff",
    )
    artifacts: list[ArtifactOut]


class JobList(BaseModel):
    """A page of jobs, newest first; pass ``next_cursor`` as ``after`` for the next page."""

    object: Literal["list"] = "list"
    data: list[JobOut]
    has_more: bool
    next_cursor: str | None


class EventOut(BaseModel):
    """A progress event; ``id`` increases and is the cursor (and the SSE event id)."""

    object: Literal["event"] = "event"
    id: int
    attempt: int
    stage: str
    kind: str
    step: int
    total: int
    message: str
    metrics: dict[str, float]
    data: dict[str, Any]
    time: datetime


class EventList(BaseModel):
    """A page of events, oldest first."""

    object: Literal["list"] = "list"
    data: list[EventOut]
    has_more: bool
    next_cursor: str | None


class MetricPointOut(BaseModel):
    """One point of a metric series."""

    step: int
    value: float
    time: datetime


class ArtifactList(BaseModel):
    """All artifacts of a job."""

    object: Literal["list"] = "list"
    data: list[ArtifactOut]


class CatalogEntry(BaseModel):
    """A name a spec may use, found under the configured model or data root."""

    name: str = Field(description="The name to put in the spec (relative to the root, '/'-separated).")
    kind: Literal["model", "gguf", "adapter", "data"] = Field(
        description="model: a directory with config.json; gguf: a .gguf file; adapter: a PEFT LoRA adapter; "
        "data: a data file."
    )
    size: int = Field(description="Bytes on disk (sum over a directory's files).")
    model_type: str | None = Field(None, description="The config's model_type for a model directory.")


class CatalogList(BaseModel):
    """Names under a root, sorted."""

    object: Literal["list"] = "list"
    data: list[CatalogEntry]


class Health(BaseModel):
    """Liveness / readiness answer."""

    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(default_factory=dict)
