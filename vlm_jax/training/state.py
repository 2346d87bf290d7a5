"""The train state: a plain pytree of step, parameters, optimizer state and non-finite counts."""
from typing import Any

import flax.struct
import jax

from vlm_jax.training import nonfinite


@flax.struct.dataclass
class TrainState:
  step: jax.Array      # int32 scalar: steps taken (batches consumed); health.skipped of them
                       # were not applied
  params: Any
  opt_state: Any
  health: nonfinite.Health  # counts of non-finite steps (vlm_jax/training/nonfinite.py)
