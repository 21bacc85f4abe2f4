"""Recovery from a push that died half-way (docs/design.md section 3).

A worker killed in the middle of a push (SIGKILL, a lost machine) has its
work on the parameter servers cancelled where it stands. Two places leave
GBA's scheduling state waiting for something that will never come:

* between taking a ticket and landing it: the ticket's global step stays
  one landing short for good (the closure's rerun takes a *new* ticket);
  once the queue is empty, every push blocks on it;
* between claiming an apply and finishing it: the busy flag stays set, and
  no later push may claim an apply.

Neither is visible to a single push, but both are to an observer: the
ticket queue is empty, nothing changes, and either a step is short or an
apply is claimed. No push holds a ticket for long (from its ticket to its
landing is scalar work and one add per shard), so once that picture has
stood for `stall_seconds`, the pushes it waits for are dead. The chief's
`StallWatchdog` then re-issues the missing tickets of the open steps (each
step still aggregates exactly M gradients, invariant 1), or runs the
claimed apply itself.

`stall_action` is the decision, pure Python so that it is tested by hand
(and shared with anything that models the runtime); the watchdog polls the
aggregator and carries the action out.

Example:

>>> # M = 4, next step 7 (parity 1) has 3 landings, step 8 has 4; nothing
>>> # left in the queue and no apply claimed: one ticket of step 7 is lost.
>>> stall_action(landed=(4, 3), next_step=7, busy=0, queue_size=0,
...              num_aggregate=4)
StallAction(reissue=((7, 1),), finish_apply=False)
"""

import atexit
import dataclasses
import threading
import time
import weakref
from typing import Optional, Sequence, Tuple

from absl import logging

from gba_tf import compat

# Without progress for this long while the picture says stalled, the pushes
# it waits for are taken as dead. A push holds a ticket for milliseconds;
# an apply (one optimizer step on every shard) for far less than this on
# the models GBA targets. Set `GradientAggregator.stall_seconds` higher for
# an apply that can take longer.
DEFAULT_STALL_SECONDS = 30.0

# How often the chief reads the scheduling state (one small RPC to ps:0).
DEFAULT_POLL_SECONDS = 2.0


@dataclasses.dataclass(frozen=True)
class StallAction:
  """What the chief does for a stalled schedule.

  Attributes:
    reissue: (global step, number of tickets) to put back in the queue.
    finish_apply: whether to run the claimed apply of the next step (and
      any that complete after it) on behalf of a dead push.
  """

  reissue: Tuple[Tuple[int, int], ...] = ()
  finish_apply: bool = False


def stall_action(landed: Sequence[int], next_step: int, busy: int,
                 queue_size: int, num_aggregate: int
                 ) -> Optional[StallAction]:
  """The recovery for a scheduling state that has stopped changing.

  Args:
    landed: accepted landings per buffer parity, one per open step
      (`landed[s % len(landed)]` is step s's count).
    next_step: the next global step to apply.
    busy: 1 if a push claimed the apply of `next_step`.
    queue_size: tickets left in the queue.
    num_aggregate: M.

  Returns:
    None when nothing is stuck: tickets are left (pushes can land), or every
    open step is complete and none claimed (no push has come to claim it;
    cannot stay so while pushes run). Otherwise the action.
  """
  if queue_size > 0:
    return None
  if busy:
    # The claimer died; its apply is finished by the chief. Tickets the
    # apply's refill would have queued follow once it is done.
    return StallAction(finish_apply=True)
  reissue = []
  for step in range(next_step, next_step + len(landed)):
    missing = num_aggregate - int(landed[step % len(landed)])
    if missing > 0:
      reissue.append((step, missing))
  if not reissue:
    return None
  return StallAction(reissue=tuple(reissue))


class StallWatchdog:
  """A chief-side thread that recovers the schedule from dead pushes.

  Started by `GradientAggregator` the first time a push is traced (on the
  coordinator). It holds the aggregator weakly and ends with it, or with
  `stop()`.

  Args:
    aggregator: a `GradientAggregator` (`progress()` and `recover(action)`).
    stall_seconds: how long the state must stand still before acting.
    poll_seconds: time between reads of the state.
  """

  def __init__(self, aggregator, stall_seconds: float, poll_seconds: float):
    self._aggregator = weakref.ref(aggregator)
    self._stall_seconds = stall_seconds
    self._poll_seconds = poll_seconds
    self._stop = threading.Event()
    self.recoveries = 0
    self._thread = threading.Thread(target=self._run, daemon=True,
                                    name="gba-stall-watchdog")

  def start(self) -> None:
    # The cluster this watchdog's aggregator lives on; connecting elsewhere
    # (or again) ends the watchdog.
    self._server_def = compat.current_server_def()
    _RUNNING.add(self)
    self._thread.start()

  def stop(self, timeout: float = 10.0) -> None:
    self._stop.set()
    thread = self._thread
    if thread.is_alive() and thread is not threading.current_thread():
      thread.join(timeout)

  def _run(self) -> None:
    try:
      self._watch()
    finally:
      _RUNNING.discard(self)

  def _watch(self) -> None:
    last, since = None, time.monotonic()
    while not self._stop.wait(self._poll_seconds):
      aggregator = self._aggregator()
      if (aggregator is None
          or compat.current_server_def() is not self._server_def):
        return
      last, since = self._check(aggregator, last, since)
      # No strong reference across the wait: the aggregator may go.
      del aggregator

  def _check(self, aggregator, last, since):
    """One poll: the (state, since when) to remember, after any action."""
    try:
      state = aggregator.progress()
    except Exception as e:  # pylint: disable=broad-except
      # The cluster may be going away (end of a phase, a lost PS that the
      # chief is about to report); try again later.
      logging.log_every_n_seconds(
          logging.INFO, "[gba] stall watchdog could not read the schedule: "
          "%s", 60, e)
      return None, time.monotonic()
    now = time.monotonic()
    if state != last:
      return state, now
    if now - since < self._stall_seconds:
      return last, since
    landed, next_step, busy, queue_size = state
    action = stall_action(landed, next_step, busy, queue_size,
                          aggregator.num_aggregate)
    if action is None:
      return last, since
    logging.warning(
        "[gba] no push has landed for %.0f s at global step %d with the "
        "ticket queue empty (landed %s, apply claimed: %s): a push died "
        "half-way; %s.", now - since, next_step, list(landed), bool(busy),
        "finishing its apply" if action.finish_apply else
        "re-issuing tickets " + ", ".join(
            f"{n} of step {s}" for s, n in action.reissue))
    try:
      aggregator.recover(action, state)
      self.recoveries += 1
    except Exception as e:  # pylint: disable=broad-except
      logging.error("[gba] stall recovery failed: %s", e)
    return None, time.monotonic()


# Watchdogs whose thread runs; stopped at exit so that no thread is inside a
# TensorFlow call while the interpreter shuts down.
_RUNNING = weakref.WeakSet()


@atexit.register
def stop_all() -> None:
  """Stops every running stall watchdog (at exit, or before a test
  switches clusters)."""
  running = list(_RUNNING)
  for watchdog in running:
    watchdog._stop.set()  # pylint: disable=protected-access
  for watchdog in running:
    watchdog.stop()
