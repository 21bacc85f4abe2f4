"""Where a push's time goes: its phases, from per-push timestamps.

`GradientAggregator.enable_push_trace()` records, for every push, the
worker, the token it read and the global step it joined (its ticket's), and
the times of its landmarks (each task's `tf.timestamp()`: use it where the
tasks' clocks agree, as in a local cluster):

    read     the worker read its token (the step began); timed on the
             first PS just before the read runs (`tokens.TokenService`:
             a time taken after it came late on a busy PS)
    arrive   the gradients reached the first PS task
    ticket   the push had its ticket (its place in the global order)
    landed   its landing was counted in the scalar section
    end      it returned (after the applier's reply, if it completed a step)

`phases()` turns those rows into the durations the simulator's calibration
(`gba_tf.sim.calibration`) takes as measured inputs, instead of fitting
them: a worker's token-to-arrival time (its compute, and the spread of it),
the wait for a ticket, the adds and landing, the apply a claiming push
waits for, the time from a push's end to its worker's next token read
(the coordinator's dispatch and the reply's trip), and the pause between
two training loops: Keras' `fit` ends each epoch by joining every
scheduled step, so the workers stop together, and start the next loop
together after the chief's epoch-end work.

Pure numpy: the runtime records, this module reads.

Example:

>>> rows = [[0, 0, 0, 0.00, 0.03, 0.031, 0.033, 0.033, 0],
...         [0, 0, 0, 0.05, 0.08, 0.081, 0.083, 0.093, 1]]
>>> p = phases(rows, num_workers=1, warmup_fraction=0.0)
>>> round(p["gap_s"][0], 3), round(p["apply_s"], 3), p["claim_fraction"]
(0.017, 0.01, 0.5)

Two loops of one push each: the gap between them is the loop's pause.

>>> p = phases(rows, num_workers=1, warmup_fraction=0.0, loop_steps=1)
>>> p["gap_s"], round(p["loop_pause_s"], 3)
([None], 0.017)
"""

from typing import Dict, Sequence

import numpy as np

# Columns of a trace row.
COLUMNS = ("worker", "token", "step", "read", "arrive", "ticket", "landed",
           "end", "claimed")
(WORKER, TOKEN, STEP, READ, ARRIVE, TICKET, LANDED, END,
 CLAIMED) = range(len(COLUMNS))


def phases(rows: Sequence[Sequence[float]], num_workers: int,
           warmup_fraction: float = 0.1,
           loop_steps: int = 0) -> Dict[str, object]:
  """Mean phase durations of the traced pushes, in seconds.

  The first `warmup_fraction` of the pushes (by read time: tracing and
  start-up) are left out.

  Args:
    rows: one row per push, `COLUMNS` in order, from the run's first push.
    num_workers: N (a worker without pushes gets None entries).
    warmup_fraction: share of the earliest pushes left out, in [0, 1).
    loop_steps: local steps per training loop (a `fit` epoch), or 0 for
      no loops. A loop's end is where every push has ended before the next
      read: the longest such pause within a tenth of a loop of each
      multiple of `loop_steps` (a step retried or read early can move it by
      one). A worker's gap across a loop's end is that pause, not its
      dispatch: it is left out of `gap_s` and measured as `loop_pause_s`.

  Returns:
    A dict of:
      pushes: the pushes summarized.
      arrive_s: per worker, mean token read to arrival at the first PS.
      arrive_log_sd: per worker, standard deviation of log(arrive_s).
      ticket_wait_s: mean arrival to ticket.
      land_s: mean ticket to counted landing.
      apply_s: mean landing to end of the pushes that completed a step.
      claim_fraction: share of pushes that completed a step.
      gap_s: per worker, mean end of a push to the worker's next read.
      land_log_sd, apply_log_sd: standard deviations of log(land) and
        log(apply), over all pushes (claims for apply).
      gap_log_sd: per worker, standard deviation of log(gap).
      loop_pause_s: median over the loops' ends past the warm-up of the
        time from a loop's last end to the next loop's first read (None
        without `loop_steps` or such an end).
  """
  if not 0 <= warmup_fraction < 1:
    raise ValueError(f"Received: warmup_fraction={warmup_fraction!r}, "
                     "which must be in [0, 1).")
  if isinstance(loop_steps, bool) or not isinstance(
      loop_steps, (int, np.integer)) or loop_steps < 0:
    raise ValueError(f"Received: loop_steps={loop_steps!r}, which must be "
                     "an integer >= 0.")
  t = np.asarray(rows, np.float64).reshape(-1, len(COLUMNS))
  t = t[np.argsort(t[:, READ], kind="stable")]
  loop, pauses = _loops(t, int(loop_steps))
  start = int(len(t) * warmup_fraction)
  t, loop = t[start:], loop[start:]
  pauses = [pause for at, pause in pauses if at >= start]
  worker = t[:, WORKER].astype(np.int64)
  claimed = t[:, CLAIMED] > 0
  arrive = t[:, ARRIVE] - t[:, READ]
  land = t[:, LANDED] - t[:, TICKET]
  apply = (t[:, END] - t[:, LANDED])[claimed]
  out = {"pushes": int(len(t)),
         "ticket_wait_s": _mean(t[:, TICKET] - t[:, ARRIVE]),
         "land_s": _mean(land), "land_log_sd": _log_sd(land),
         "apply_s": _mean(apply), "apply_log_sd": _log_sd(apply),
         "claim_fraction": float(claimed.mean()) if len(t) else 0.0,
         "arrive_s": [], "arrive_log_sd": [], "gap_s": [], "gap_log_sd": [],
         "loop_pause_s": float(np.median(pauses)) if pauses else None}
  for w in range(num_workers):
    mine, mine_loop = t[worker == w], loop[worker == w]
    out["arrive_s"].append(_mean(arrive[worker == w]))
    out["arrive_log_sd"].append(_log_sd(arrive[worker == w]))
    # A push's end to the same worker's next read, within a loop.
    gap = (mine[1:, READ] - mine[:-1, END])[mine_loop[1:] == mine_loop[:-1]]
    out["gap_s"].append(_mean(gap))
    out["gap_log_sd"].append(_log_sd(gap))
  return out


def _loops(t, loop_steps: int):
  """Each push's loop, and (index, pause) of each loop's first push.

  `t` is sorted by read time. A loop starts at the read that follows the
  longest time in which no push was in flight, near each multiple of
  `loop_steps`."""
  n = len(t)
  loop = np.zeros(n, np.int64)
  if not loop_steps or n < 2:
    return loop, []
  # idle[k]: from the last end among the pushes read before push k to its
  # read (negative: some push was still in flight).
  idle = np.full(n, -np.inf)
  idle[1:] = t[1:, READ] - np.maximum.accumulate(t[:-1, END])
  window = max(1, loop_steps // 10)
  starts = []
  for nominal in range(loop_steps, n, loop_steps):
    lo, hi = max(1, nominal - window), min(n, nominal + window + 1)
    starts.append(lo + int(np.argmax(idle[lo:hi])))
  for k in starts:
    loop[k:] += 1
  return loop, [(k, float(idle[k])) for k in starts]


def _log_sd(values):
  """Standard deviation of the logs of the positive `values` (None if
  fewer than two)."""
  values = np.asarray(values, np.float64)
  values = values[values > 0]
  return float(np.std(np.log(values))) if len(values) > 1 else None


def _mean(values):
  """The mean, or None (JSON's null) where there is nothing to average."""
  values = np.asarray(values, np.float64)
  return float(values.mean()) if values.size else None
