"""Dynamic knowledge recovery (ALGORITHM.md section 5): re-weighted data mixing and the LoRA fine-tuning stage.

:func:`recover` is the stage verb (:mod:`lorashear.recovery.loop`); :func:`mix_weights` the re-weighting rule
(:mod:`lorashear.recovery.mixing`); :func:`reconstruct` the least-squares refit of the output projections that
``recovery.reconstruct`` runs first (:mod:`lorashear.recovery.reconstruct`).
"""

from lorashear.recovery.loop import RecoveryResult, RecoveryStage, recover, recovery_stages
from lorashear.recovery.mixing import mix_weights, round_record
from lorashear.recovery.reconstruct import ReconstructionResult, reconstruct

__all__ = [
    "ReconstructionResult",
    "RecoveryResult",
    "RecoveryStage",
    "mix_weights",
    "reconstruct",
    "recover",
    "recovery_stages",
    "round_record",
]
