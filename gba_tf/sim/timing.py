"""How long things take in the simulator: worker compute and stragglers.

A worker's compute time per local step is

    base_s * noise * slowdown(worker, t)

* `noise` is 1 ("constant") or lognormal with median 1 and shape `sigma`
  ("lognormal"): a heavy right tail, as step times on shared clusters have.
* `slowdown` is a fixed factor for named workers (`fixed`, e.g. worker 1 at
  4x, the benchmark's straggler) times, while an *episode* lasts, the
  episode's factor. Episodes start on each worker as a Poisson process
  (`episode_rate_per_hour`), last log-uniformly between `episode_min_s` and
  `episode_max_s` (tens of seconds to hours) and slow the worker by a factor
  uniform in `episode_slowdown` (2-10x): the straggler pattern production
  reports describe (the GBA paper, Sec. 2, Fig. 2).

Every worker draws from its own random stream, so adding workers does not
change the draws of the others.

Example:

>>> model = ComputeModel(base_s=0.05, fixed={1: 4.0})
>>> clock = model.clocks(num_workers=2, seed=0)
>>> clock[0].sample(0.0), clock[1].sample(0.0)
(0.05, 0.2)
"""

import dataclasses
import math
from typing import Dict, List, Tuple

import numpy as np

DISTRIBUTIONS = ("constant", "lognormal")


@dataclasses.dataclass(frozen=True)
class ComputeModel:
  """Per-step compute time of the workers; see the module docstring.

  Attributes:
    base_s: median seconds per local step of a healthy worker (> 0).
    distribution: "constant" or "lognormal".
    sigma: lognormal shape (>= 0); 0.3 gives a p99 of about 2x the median.
    fixed: worker index -> permanent slowdown factor (>= 1).
    episode_rate_per_hour: straggler episodes per worker-hour (>= 0).
    episode_min_s, episode_max_s: bounds of an episode's length.
    episode_slowdown: (low, high) of an episode's factor.
  """
  base_s: float
  distribution: str = "constant"
  sigma: float = 0.0
  fixed: Dict[int, float] = dataclasses.field(default_factory=dict)
  episode_rate_per_hour: float = 0.0
  episode_min_s: float = 30.0
  episode_max_s: float = 3600.0
  episode_slowdown: Tuple[float, float] = (2.0, 10.0)

  def __post_init__(self):
    if not self.base_s > 0:
      raise ValueError(f"Received: base_s={self.base_s!r}, which must be "
                       "> 0.")
    if self.distribution not in DISTRIBUTIONS:
      raise ValueError(f"Received: distribution={self.distribution!r}, "
                       f"which is not one of {DISTRIBUTIONS}.")
    if not self.sigma >= 0:
      raise ValueError(f"Received: sigma={self.sigma!r}, which must be >= 0.")
    for worker, factor in self.fixed.items():
      if not factor >= 1:
        raise ValueError(f"Received: slowdown {factor!r} for worker "
                         f"{worker}, which must be >= 1.")
    if not self.episode_rate_per_hour >= 0:
      raise ValueError(f"Received: episode_rate_per_hour="
                       f"{self.episode_rate_per_hour!r}, which must be >= 0.")
    if not 0 < self.episode_min_s <= self.episode_max_s:
      raise ValueError(f"Received: episode_min_s={self.episode_min_s!r}, "
                       f"episode_max_s={self.episode_max_s!r}; need "
                       "0 < min <= max.")
    low, high = self.episode_slowdown
    if not 1 <= low <= high:
      raise ValueError(f"Received: episode_slowdown={self.episode_slowdown!r}"
                       "; need 1 <= low <= high.")

  def clocks(self, num_workers: int, seed: int) -> List["WorkerClock"]:
    """One independent sampler per worker."""
    return [WorkerClock(self, i, np.random.default_rng([seed, i]))
            for i in range(num_workers)]

  def mean_slowdown(self) -> float:
    """Long-run mean episode factor on one worker (1 without episodes)."""
    if not self.episode_rate_per_hour:
      return 1.0
    lo, hi = self.episode_min_s, self.episode_max_s
    mean_len = (hi - lo) / math.log(hi / lo) if hi > lo else lo
    busy = self.episode_rate_per_hour / 3600.0 * mean_len
    share = busy / (1.0 + busy)  # fraction of time inside an episode
    return 1.0 + share * (sum(self.episode_slowdown) / 2.0 - 1.0)


class WorkerClock:
  """Draws one worker's compute times, in order of simulated time."""

  def __init__(self, model: ComputeModel, worker: int, rng):
    self._model = model
    self._rng = rng
    self._fixed = model.fixed.get(worker, 1.0)
    self._rate = model.episode_rate_per_hour / 3600.0
    self._episode = (math.inf, math.inf, 1.0)  # start, end, factor
    if self._rate:
      self._episode = self._next_episode(0.0)

  def _next_episode(self, after: float):
    m = self._model
    start = after + self._rng.exponential(1.0 / self._rate)
    length = math.exp(self._rng.uniform(math.log(m.episode_min_s),
                                        math.log(m.episode_max_s)))
    return start, start + length, self._rng.uniform(*m.episode_slowdown)

  def slowdown(self, t: float) -> float:
    """The worker's slowdown factor at time `t` (t never decreases)."""
    start, end, factor = self._episode
    while t >= end:
      start, end, factor = self._episode = self._next_episode(end)
    return self._fixed * (factor if t >= start else 1.0)

  def sample(self, t: float) -> float:
    """Seconds of compute for a local step starting at time `t`."""
    noise = 1.0
    if self._model.distribution == "lognormal" and self._model.sigma:
      noise = float(self._rng.lognormal(0.0, self._model.sigma))
    return self._model.base_s * noise * self.slowdown(t)
