"""Dynamic knowledge recovery (ALGORITHM.md section 5): re-weighted data mixing and the LoRA fine-tuning stage.

:func:`recover` is the stage verb (:mod:`lorashear.recovery.loop`); :func:`mix_weights` the re-weighting rule
(:mod:`lorashear.recovery.mixing`).
"""

from lorashear.recovery.loop import RecoveryResult, RecoveryStage, recover, recovery_stages
from lorashear.recovery.mixing import mix_weights, round_record

__all__ = ["RecoveryResult", "RecoveryStage", "mix_weights", "recover", "recovery_stages", "round_record"]
