"""Staleness decay: how much a stale local gradient counts in a global step.

GBA (arXiv 2205.11048, Sec. 3.2) tags every local gradient with a token, the
global step the worker read before its forward pass. When the gradient reaches
the parameter server at global step `s`, its staleness is `tau = s - token`.
Gradients with `tau <= threshold` count fully; beyond the threshold they are
decayed by `f(tau)`; past a hard limit they are dropped and do not count
towards the `M` gradients of a global step.

The aggregated update is `sum_i f(tau_i) * g_i / M` (Sec. 3.2), so decaying a
gradient shrinks its share without changing the scale of the update.

The paper's exact decay function is not reproduced here. The shapes below are
configurable and the defaults in `gba_tf.config` are provisional until the
ablation in `scripts/benchmark.py` chooses them (see that module's docstring).

This module is pure numpy. The runtime (`gba_tf.accumulator`) does not
re-implement the rule in TensorFlow: it gathers from `weight_table()`, a
numpy table of `weight(tau)` placed on the first PS task, so one definition
serves the runtime and any offline use (a simulator, the tests), and a unit
test of `StalenessPolicy.weight` covers both.

Example:

>>> policy = StalenessPolicy(threshold=2, decay="exponential",
...                          decay_rate=0.5, max_staleness=5)
>>> [float(policy.weight(t)) for t in range(7)]
[1.0, 1.0, 1.0, 0.5, 0.25, 0.125, 0.0]
"""

import dataclasses
from typing import Callable, Dict, Optional

import numpy as np

# Table length when nothing is dropped (max_staleness=None): staleness past
# it reads the last entry. Exponential weights underflow float32 long before
# (0.5^150 == 0), and 4096 global steps of staleness is past any cluster's.
_UNBOUNDED_TABLE_LENGTH = 4096

# f(excess, rate, pow_fn) where excess = tau - threshold > 0.
_DecayFn = Callable[[object, float, Callable], object]

DECAYS: Dict[str, _DecayFn] = {
    # Every accepted gradient counts fully: plain async / GBA without decay.
    "none": lambda excess, rate, pow_fn: excess * 0.0 + 1.0,
    # Halve (for rate=0.5) the weight per global step beyond the threshold.
    "exponential": lambda excess, rate, pow_fn: pow_fn(rate, excess),
    # Hogwild-style 1/tau shape: slower than exponential for large tau.
    "inverse": lambda excess, rate, pow_fn: 1.0 / (1.0 + rate * excess),
}


def _check_decay(decay: str, decay_rate: float) -> None:
  if decay not in DECAYS:
    raise ValueError(
        f"Received: decay={decay!r}, which is not one of {sorted(DECAYS)}.")
  if decay == "exponential" and not 0.0 < decay_rate <= 1.0:
    raise ValueError(
        f"Received: decay_rate={decay_rate!r}; the exponential decay needs "
        "0 < decay_rate <= 1.")
  if decay == "inverse" and not decay_rate > 0.0:
    raise ValueError(
        f"Received: decay_rate={decay_rate!r}; the inverse decay needs "
        "decay_rate > 0.")


@dataclasses.dataclass(frozen=True)
class StalenessPolicy:
  """Maps a staleness `tau` to the weight of its gradient (0 = dropped).

  Thread-safe: immutable.

  Attributes:
    threshold: gradients with `tau <= threshold` get weight 1.
    decay: name of the decay shape applied beyond the threshold, one of
      `DECAYS`.
    decay_rate: parameter of the decay shape.
    max_staleness: gradients with `tau > max_staleness` are dropped (weight 0,
      not counted towards M). `None` never drops.
  """

  threshold: int = 0
  decay: str = "none"
  decay_rate: float = 0.5
  max_staleness: Optional[int] = None

  def __post_init__(self):
    if not isinstance(self.threshold, int) or self.threshold < 0:
      raise ValueError(
          f"Received: staleness_threshold={self.threshold!r}, which must be "
          "an integer >= 0.")
    _check_decay(self.decay, self.decay_rate)
    if self.max_staleness is not None and (
        not isinstance(self.max_staleness, int) or self.max_staleness < 0):
      raise ValueError(
          f"Received: max_staleness={self.max_staleness!r}, which must be "
          "None or an integer >= 0.")

  def accepts(self, tau):
    """True where a gradient of staleness `tau` is aggregated (not dropped)."""
    if self.max_staleness is None:
      return np.ones_like(tau, bool)
    return np.asarray(tau) <= self.max_staleness

  def weight(self, tau):
    """Weight `f(tau)` in [0, 1]; 0 where the gradient is dropped.

    Args:
      tau: staleness, an int or numpy array.

    Returns:
      float32 numpy of the same shape.
    """
    decay_fn = DECAYS[self.decay]
    tau_f = np.maximum(np.asarray(tau, np.float64), 0.0)
    excess = np.maximum(tau_f - self.threshold, 0.0)
    decayed = decay_fn(excess, self.decay_rate, np.power)
    w = np.where(tau_f <= self.threshold, 1.0, decayed)
    return np.where(self.accepts(np.asarray(tau)), w, 0.0).astype(np.float32)

  def weight_table(self) -> np.ndarray:
    """`weight(tau)` for tau = 0, 1, ..., as float32; look up with
    `table[min(tau, len(table) - 1)]`.

    With `max_staleness` set, the last entry is the first dropped tau (weight
    0), so the clamped lookup is exact for every tau. Without it, the table
    is `_UNBOUNDED_TABLE_LENGTH` long and later taus read its last weight.

    Example:

    >>> StalenessPolicy(threshold=1, decay="exponential", decay_rate=0.5,
    ...                 max_staleness=3).weight_table().tolist()
    [1.0, 1.0, 0.5, 0.25, 0.0]
    """
    length = (_UNBOUNDED_TABLE_LENGTH if self.max_staleness is None
              else self.max_staleness + 2)
    return self.weight(np.arange(length))
