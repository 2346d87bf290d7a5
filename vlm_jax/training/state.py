"""The train state: a plain pytree of step, parameters and optimizer state."""
from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
  step: jax.Array      # int32 scalar: number of updates applied
  params: Any
  opt_state: Any
