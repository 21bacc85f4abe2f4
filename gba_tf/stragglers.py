"""Straggler specs: which workers run slow, and how much slower.

A spec names workers and slowdown factors, `"INDEX:SLOWDOWN[,...]"`:
`"1:4"` is worker 1 at a quarter of the speed, `"1:3,5:6"` two stragglers at
a third and a sixth. The job's emulated compute (`gba_tf.data.synthetic`),
the launcher's flags, the benchmark's ideal throughput and the simulator's
calibration all read the same spec, through `parse`.

Pure Python: the simulator uses it without TensorFlow.

Example:

>>> parse("1:3,5:6")
{1: 3.0, 5: 6.0}
>>> parse("")
{}
"""

import math
from typing import Dict, List, Mapping, Optional, Sequence


# A straggler measured at under this share of its spec's slowdown lagged
# markedly less than the spec says (`milder_than_spec`).
SPEC_SHARE = 0.8


def parse(spec: str) -> Dict[int, float]:
  """`"1:3,5:6"` -> `{1: 3.0, 5: 6.0}`; `""` -> `{}` (no straggler).

  Raises:
    ValueError: one line naming the spec, for a malformed part, an index
      below 0 or named twice, or a slowdown below 1 or not finite.
  """
  if not spec:
    return {}
  out = {}
  for part in spec.split(","):
    try:
      index, slowdown = part.split(":")
      index, slowdown = int(index), float(slowdown)
    except ValueError:
      raise ValueError(f"Received: straggler={spec!r}, which is not "
                       "INDEX:SLOWDOWN[,INDEX:SLOWDOWN...] (e.g. 1:4 or "
                       f"1:3,5:6) in part {part!r}.") from None
    if index in out:
      raise ValueError(f"Received: straggler={spec!r}, which names worker "
                       f"{index} twice.")
    out[index] = slowdown
  validate(out, spec)
  return out


def validate(stragglers: Mapping[int, float], spec=None) -> None:
  """Checks indices >= 0 and finite slowdowns >= 1 (one-line ValueError)."""
  for index, slowdown in stragglers.items():
    if index < 0 or not (slowdown >= 1.0 and math.isfinite(slowdown)):
      shown = repr(spec) if spec is not None else dict(stragglers)
      raise ValueError(f"Received: straggler={shown}; need INDEX >= 0 and "
                       "a finite SLOWDOWN >= 1 for every worker named.")


def format_spec(stragglers: Mapping[int, float]) -> str:
  """The inverse of `parse`: `{1: 3.0}` -> `"1:3"`."""
  return ",".join(f"{i}:{s:g}" for i, s in sorted(stragglers.items()))


def speed_factors(stragglers: Mapping[int, float],
                  num_workers: int) -> list:
  """Each worker's slowdown (1.0 for a healthy one), by index."""
  return [float(stragglers.get(i, 1.0)) for i in range(num_workers)]


def measured_slowdowns(pushed: Sequence[int],
                       stragglers: Mapping[int, float]
                       ) -> Dict[int, Optional[float]]:
  """How much slower each named worker really ran, from its push count.

  Every worker trains for the job's whole wall-clock time, so its pushes
  count its speed: worker i ran `mean(pushes of the workers not named) /
  pushes_i` times slower (None if it pushed nothing). The emulation sleeps
  `slowdown * step_ms` per batch on a straggler, but a healthy worker whose
  real step takes longer than `step_ms` (workers sharing too few cores)
  runs slower than `step_ms` too, so on a slow host a straggler lags less
  than its spec says; this is what it did lag.

  Example (worker 1 named at 1/4 speed pushed 100 while the others pushed
  380, 400 and 420, 400 on average: it ran at 1/4. Named at 1/3 and 1/6,
  workers 1 and 3 pushed 100 and 160 of the others' 480: they ran at 1/4.8
  and 1/3):

  >>> measured_slowdowns([380, 100, 400, 420], {1: 4.0})
  {1: 4.0}
  >>> measured_slowdowns([480, 100, 480, 160], {1: 3.0, 3: 6.0})
  {1: 4.8, 3: 3.0}
  >>> measured_slowdowns([480, 0], {1: 4.0})
  {1: None}

  Raises:
    ValueError: one line naming the counts, when no worker is left
      unnamed to compare with or a named index has no count.
  """
  healthy = [n for i, n in enumerate(pushed) if i not in stragglers]
  if not healthy or any(i >= len(pushed) for i in stragglers):
    raise ValueError(f"Received: pushed={list(pushed)} with stragglers "
                     f"{format_spec(stragglers)!r}; need a count for every "
                     "worker named and at least one worker not named.")
  base = sum(healthy) / len(healthy)
  return {i: (base / pushed[i] if pushed[i] else None)
          for i in sorted(stragglers)}


def milder_than_spec(measured: Mapping[int, Optional[float]],
                     stragglers: Mapping[int, float],
                     share: float = SPEC_SHARE) -> List[int]:
  """The named workers whose `measured_slowdowns` are under `share` of
  their spec's: on this host they were not the stragglers the spec names.

  Example (1:4 measured at 2.2 is under 0.8 x 4 = 3.2; 3.8 is not, nor
  is 5.0 of a 1:6, whose bound is 4.8):

  >>> milder_than_spec({1: 2.2}, {1: 4.0})
  [1]
  >>> milder_than_spec({1: 3.8, 3: 5.0}, {1: 4.0, 3: 6.0})
  []
  """
  return sorted(i for i, v in measured.items()
                if v is not None and v < share * stragglers[i])
