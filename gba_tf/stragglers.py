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
from typing import Dict, Mapping


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
