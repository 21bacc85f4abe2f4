"""The global order of GBA pushes: tickets, staleness, weights, applies.

GBA (arXiv 2205.11048, Sec. 3.2) applies global step `s` from exactly M
accepted local gradients. Here a gradient's place in that order is a
*ticket*: ticket `t` joins step `s = t // M`; the gradient's staleness is
`tau = s - token`, where the token is the global step its worker read
before the forward pass (Sec. 3.1); `tau` alone decides its weight and
whether it is dropped (`gba_tf.staleness`). Tickets are issued two global
steps ahead (`OPEN_STEPS`): the tickets of step `s + 2` exist only once step
`s` is applied, so no push runs more than two steps ahead of the model.

These rules are written once, here, as arithmetic that works alike on
Python ints, numpy arrays and TensorFlow tensors. The runtime
(`gba_tf.accumulator`) evaluates them on the first PS task with TF ops;
the simulator (`gba_tf.sim`) evaluates them on numpy. Where an operation
differs between the two (an elementwise max, a table lookup), the caller
passes it in as `Ops`.

Example (M = 4, threshold 2, exponential decay 0.5, dropped past 16):

>>> import numpy as np
>>> from gba_tf import config
>>> tables = Tables.of(config.GBAConfig(global_batch_size=4,
...                                     local_batch_size=1).policy)
>>> step = step_of(np.array([0, 5, 13]), 4)     # tickets 0, 5, 13
>>> tau = staleness(step, np.array([0, 0, 0]), NUMPY_OPS)
>>> step.tolist(), tau.tolist()
([0, 1, 3], [0, 1, 3])
>>> tables.weight(tau, NUMPY_OPS).tolist(), tables.accepts(tau, NUMPY_OPS).tolist()
([1.0, 1.0, 0.5], [True, True, True])
"""

import dataclasses
from typing import Any, Callable, Tuple

import numpy as np

from gba_tf import staleness as staleness_lib

# Global steps whose tickets are out at once: pushes fill step s + 1 while
# step s is applied, never step s + 2.
OPEN_STEPS = 2


@dataclasses.dataclass(frozen=True)
class Ops:
  """The elementwise operations that differ between numpy and TensorFlow."""
  maximum: Callable[[Any, Any], Any]
  minimum: Callable[[Any, Any], Any]
  take: Callable[[Any, Any], Any]  # take(table, indices)


NUMPY_OPS = Ops(maximum=np.maximum, minimum=np.minimum, take=np.take)


def initial_tickets(num_aggregate: int) -> Tuple[int, int]:
  """[start, stop) of the tickets issued before any step is applied."""
  return 0, OPEN_STEPS * num_aggregate


def refill(applied_step, num_aggregate: int):
  """[start, stop) of the tickets issued once `applied_step` is applied:
  those of step `applied_step + OPEN_STEPS`."""
  start = (applied_step + OPEN_STEPS) * num_aggregate
  return start, start + num_aggregate


def step_of(ticket, num_aggregate: int):
  """The global step a ticket joins."""
  return ticket // num_aggregate


def parity(step):
  """Which of the `OPEN_STEPS` accumulation buffers step `step` uses."""
  return step % OPEN_STEPS


def staleness(step, token, ops: Ops):
  """`tau = step - token`, at least 0 (a token is never ahead of its step)."""
  return ops.maximum(step - token, 0)


def complete(landed, num_aggregate: int):
  """Whether a step with `landed` accepted landings can be applied."""
  return landed >= num_aggregate


@dataclasses.dataclass(frozen=True)
class Tables:
  """`StalenessPolicy` as lookup tables, indexed by `min(tau, len - 1)`.

  The runtime places them as constants on the first PS task; the simulator
  indexes them in numpy: one definition of the decay and of the drop rule.

  Attributes:
    weights: `policy.weight(tau)` for tau = 0, 1, ... (float32).
    accepted: `policy.accepts(tau)` for the same taus (bool).
  """
  weights: np.ndarray
  accepted: np.ndarray

  @classmethod
  def of(cls, policy: staleness_lib.StalenessPolicy) -> "Tables":
    weights = policy.weight_table()
    return cls(weights, np.asarray(policy.accepts(np.arange(len(weights)))))

  def _index(self, tau, ops: Ops):
    return ops.minimum(tau, len(self.weights) - 1)

  def weight(self, tau, ops: Ops):
    """The weight `f(tau)` of a gradient (0 where it is dropped)."""
    return ops.take(self.weights, self._index(tau, ops))

  def accepts(self, tau, ops: Ops):
    """Whether a gradient of staleness `tau` counts towards a step's M."""
    return ops.take(self.accepted, self._index(tau, ops))
