"""What staleness costs in accuracy: a small model trained along a schedule.

`train` replays a simulated run (`engine.SimResult`) on a logistic
regression in numpy: the k-th push's gradient is computed on the parameter
version its token names, on the k-th batch of a fixed data stream, weighted
as the run decided, and every global step applies the mean of its accepted
gradients (GBA, Sec. 3.2 of arXiv 2205.11048: `sum_i f(tau_i) g_i / M`), so
sync, async and GBA differ only by the schedule. With the same learning
rate for every mode (tuned for sync: the "no re-tuning" promise), the
held-out AUC at a fixed number of samples is the cost of the schedule.

The data: features x ~ N(0, I) in `num_features` dimensions, labels drawn
from a logistic model with random true weights; its best AUC (the true
weights') is known.

Example:

>>> problem = Problem(num_features=8, seed=0)
>>> x, y = problem.batch(0, 4)
>>> x.shape, y.shape
((4, 8), (4,))
"""

import dataclasses
import functools
from typing import Dict, List

import numpy as np

from gba_tf.data import synthetic
from gba_tf.sim import engine

OPTIMIZERS = ("sgd", "adagrad")


@dataclasses.dataclass(frozen=True)
class Problem:
  """A logistic-regression task with a known optimum.

  Attributes:
    num_features: dimensions of x.
    scale: norm of the true weight vector (sets the best AUC).
    seed: fixes the true weights and the data stream.
  """
  num_features: int = 32
  scale: float = 3.0
  seed: int = 0

  @functools.cached_property
  def true_weights(self) -> np.ndarray:
    w = np.random.default_rng([self.seed, 0]).normal(size=self.num_features)
    return self.scale * w / np.linalg.norm(w)

  def batch(self, index: int, size: int):
    """The `index`-th batch of the training stream (deterministic)."""
    rng = np.random.default_rng([self.seed, 1, index + 1])
    x = rng.normal(size=(size, self.num_features))
    p = 1.0 / (1.0 + np.exp(-x @ self.true_weights))
    return x, (rng.random(size) < p).astype(np.float64)

  def test_set(self, size: int = 20000):
    return self.batch(-1, size)  # a stream index no training batch uses


def _sigmoid(z):
  # Clipped: a diverging run (async with a sync-tuned rate) overflows exp.
  return 1.0 / (1.0 + np.exp(-np.clip(z, -500.0, 500.0)))


def _gradient(theta, x, y):
  return x.T @ (_sigmoid(x @ theta) - y) / len(y)


def _logloss(theta, x, y) -> float:
  p = np.clip(_sigmoid(x @ theta), 1e-7, 1 - 1e-7)
  return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def train(result: engine.SimResult, problem: Problem, learning_rate: float,
          batch_size: int = 64, optimizer: str = "sgd",
          eval_every: int = 0) -> Dict[str, object]:
  """Trains along `result`'s schedule; returns held-out AUC and logloss.

  Args:
    result: a simulated run; its pushes, tokens, steps and weights.
    problem: the task.
    learning_rate: the same for every mode.
    batch_size: samples per local step.
    optimizer: "sgd" or "adagrad" (per-coordinate, as the benchmark uses).
    eval_every: also record the held-out AUC every this many global steps
      (0: only at the end).

  Returns:
    {"auc", "logloss", "best_auc", "global_steps", "samples", "curve"}.
  """
  if optimizer not in OPTIMIZERS:
    raise ValueError(f"Received: optimizer={optimizer!r}, which is not one "
                     f"of {OPTIMIZERS}.")
  if not learning_rate > 0:
    raise ValueError(f"Received: learning_rate={learning_rate!r}, which "
                     "must be > 0.")
  m = result.num_aggregate
  order = np.argsort(result.step, kind="stable")
  steps = result.step[order]
  # Global steps that completed: exactly M accepted gradients each.
  accepted = result.accepted[order]
  counts = np.bincount(steps[accepted], minlength=int(steps.max()) + 1)
  complete = int(np.argmin(counts == m)) if np.any(counts != m) else len(
      counts)
  x_test, y_test = problem.test_set()
  versions: List[np.ndarray] = [np.zeros(problem.num_features)]
  accumulator = np.zeros(problem.num_features)
  curve = []
  bounds = np.searchsorted(steps, np.arange(complete + 1))
  samples = 0
  for s in range(complete):
    theta = versions[-1]
    total = np.zeros(problem.num_features)
    for k in order[bounds[s]:bounds[s + 1]]:
      samples += batch_size
      if not result.accepted[k]:
        continue
      x, y = problem.batch(int(k), batch_size)
      token = int(result.token[k])
      total += result.weight[k] * _gradient(versions[token], x, y)
    g = total / m
    if optimizer == "adagrad":
      accumulator += g * g
      theta = theta - learning_rate * g / np.sqrt(accumulator + 1e-7)
    else:
      theta = theta - learning_rate * g
    versions.append(theta)
    if eval_every and (s + 1) % eval_every == 0:
      curve.append({"global_steps": s + 1, "samples": samples,
                    "auc": synthetic.auc(y_test, x_test @ theta)})
  theta = versions[-1]
  return {"auc": synthetic.auc(y_test, x_test @ theta),
          "logloss": _logloss(theta, x_test, y_test),
          "best_auc": synthetic.auc(y_test, x_test @ problem.true_weights),
          "global_steps": complete,
          "samples": samples, "curve": curve}
