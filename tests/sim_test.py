"""The simulator against schedules derived by hand, and its shared rules."""

import dataclasses
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import tensorflow as tf

import gba_tf  # pylint: disable=unused-import  (TF_USE_LEGACY_KERAS first)
from gba_tf import config as config_lib
from gba_tf import push_trace
from gba_tf import schedule
from gba_tf.sim import accuracy
from gba_tf.sim import calibration
from gba_tf.sim import engine
from gba_tf.sim import timing
from tests import testing_utils


def _cluster(times, **costs):
  """Workers with fixed compute times (no noise) and the given costs."""
  base = min(times)
  fixed = {i: t / base for i, t in enumerate(times) if t != base}
  return engine.ClusterModel(
      num_workers=len(times),
      compute=timing.ComputeModel(base, fixed=fixed), **costs)


class ScheduleTest(tf.test.TestCase):

  def test_tickets_steps_and_window(self):
    # M = 4: tickets 0-7 are out first (steps 0 and 1); applying step 0
    # issues step 2's, 8-11.
    self.assertEqual(schedule.initial_tickets(4), (0, 8))
    self.assertEqual(schedule.refill(0, 4), (8, 12))
    self.assertEqual(schedule.step_of(np.array([0, 3, 4, 11]), 4).tolist(),
                     [0, 0, 1, 2])
    self.assertEqual(schedule.parity(np.array([0, 1, 2, 7])).tolist(),
                     [0, 1, 0, 1])
    self.assertTrue(schedule.complete(4, 4))
    self.assertFalse(schedule.complete(3, 4))

  def test_tables_give_the_same_answers_in_numpy_and_tensorflow(self):
    # The runtime evaluates these with TF ops, the simulator with numpy:
    # one definition, two evaluators. Threshold 2, exponential 0.5, dropped
    # past 4: weights 1, 1, 1, 0.5, 0.25, then 0.
    policy = config_lib.GBAConfig(global_batch_size=4, local_batch_size=1,
                                  max_staleness=4).policy
    tables = schedule.Tables.of(policy)
    tau = np.array([0, 1, 2, 3, 4, 5, 9], np.int64)
    tf_ops = schedule.Ops(tf.maximum, tf.minimum, tf.gather)
    weight_np = tables.weight(tau, schedule.NUMPY_OPS)
    accept_np = tables.accepts(tau, schedule.NUMPY_OPS)
    self.assertAllClose(weight_np, [1, 1, 1, 0.5, 0.25, 0, 0])
    self.assertAllEqual(accept_np, [1, 1, 1, 1, 1, 0, 0])
    self.assertAllClose(tables.weight(tf.constant(tau), tf_ops), weight_np)
    self.assertAllEqual(tables.accepts(tf.constant(tau), tf_ops), accept_np)
    self.assertAllEqual(
        schedule.staleness(tf.constant([3, 1]), tf.constant([1, 2]), tf_ops),
        schedule.staleness(np.array([3, 1]), np.array([1, 2]),
                           schedule.NUMPY_OPS))


class EngineTest(tf.test.TestCase):

  def test_two_workers_give_the_staleness_derived_by_hand(self):
    # M = 2, no costs; worker 0 takes 1 s per step, worker 1 takes 2.7 s.
    #   t=1    w0 token 0, ticket 0 -> step 0, tau 0
    #   t=2    w0 token 0, ticket 1 -> step 0, tau 0; step 0 applied
    #   t=2.7  w1 token 0, ticket 2 -> step 1, tau 1
    #   t=3    w0 token 1, ticket 3 -> step 1, tau 0; step 1 applied
    #   t=4,5  w0 tokens 2, 2: tickets 4, 5 -> step 2, tau 0; applied
    #   t=5.4  w1 token 1, ticket 6 -> step 3, tau 2
    #   t=6    w0 token 3, ticket 7 -> step 3, tau 0
    result = engine.simulate("gba", _cluster([1.0, 2.7]), local_steps=8)
    self.assertEqual(result.worker.tolist(), [0, 0, 1, 0, 0, 0, 1, 0])
    self.assertEqual(result.token.tolist(), [0, 0, 0, 1, 2, 2, 1, 3])
    self.assertEqual(result.step.tolist(), [0, 0, 1, 1, 2, 2, 3, 3])
    self.assertEqual(result.tau.tolist(), [0, 0, 1, 0, 0, 0, 2, 0])

  def test_sync_runs_at_the_slowest_workers_pace(self):
    # Every step waits for the 0.4 s worker: 3 local steps per 0.4 s.
    result = engine.simulate("sync", _cluster([0.1, 0.1, 0.4]), 3 * 400)
    self.assertAllClose(result.local_steps_per_s, 3 / 0.4, rtol=1e-6)
    self.assertEqual(int(result.tau.max()), 0)

  def test_async_and_gba_without_costs_run_at_the_sum_of_speeds(self):
    # Ideal async: 1/0.1 + 1/0.1 + 1/0.4 = 22.5 local steps/s. GBA takes a
    # ticket only when a gradient arrives, so a slow worker holds no step
    # back: it reaches the same.
    cluster = _cluster([0.1, 0.1, 0.4])
    for mode in ("async", "gba"):
      result = engine.simulate(mode, cluster, 4000)
      self.assertAllClose(result.local_steps_per_s, 22.5, rtol=0.01,
                          msg=mode)
      self.assertAllClose(result.ideal_local_steps_per_s, 22.5, rtol=1e-6)

  def test_the_scalar_section_caps_gba(self):
    # 8 workers at 10 ms, 10 ms per visit to the scalar section: each push
    # lands once and every 8th finishes a step, 1.125 visits of 10 ms per
    # push, so at most 1 / 0.01125 = 88.9 pushes/s (ideal: 800).
    result = engine.simulate("gba", _cluster([0.01] * 8, serial_s=0.01),
                             4000)
    self.assertAllClose(result.local_steps_per_s, 1 / 0.01125, rtol=0.02)
    # The old design holds one lock for the whole push, adds included.
    locked = engine.simulate(
        "gba_lock", _cluster([0.01] * 8, serial_s=0.01, add_s=0.01), 4000)
    self.assertAllClose(locked.local_steps_per_s, 1 / 0.02, rtol=0.02)

  def test_bounded_staleness_drops_by_the_policy(self):
    # Worker 3 is 20x slower: its gradients arrive many steps late and are
    # dropped past max_staleness = 4; nothing else is.
    cluster = _cluster([0.01, 0.01, 0.01, 0.2], max_staleness=4)
    result = engine.simulate("bounded_staleness", cluster, 2000)
    policy = cluster.gba_config("bounded_staleness").policy
    self.assertAllEqual(result.accepted, policy.accepts(result.tau))
    self.assertAllClose(result.weight, policy.weight(result.tau))
    self.assertTrue(np.all(result.tau[~result.accepted] > 4))
    self.assertGreater(int(np.sum(~result.accepted)), 0)
    self.assertTrue(np.all(result.accepted[result.worker != 3]))

  def test_a_dropped_ticket_goes_to_the_next_push(self):
    # Backup workers: M = 3 of 4, tau > 0 dropped. Workers 0-2 take 10 ms,
    # worker 3 50 ms; no other cost. The fast three push together with the
    # token of the open step and make each step (tau 0). Every 5th step the
    # straggler's gradient arrives about 5 steps late (its 50 ms span five
    # steps of 10 ms) and is dropped; its ticket,
    # given back, is the smallest in the queue, so the next fast push takes
    # it, for the step its token names. So only the straggler's gradients
    # are dropped. (Given back behind the next step's tickets, as a FIFO
    # did, it sent one fast push per drop to the step after its token's:
    # tau 1, dropped, its ticket given back behind again; 20% of the fast
    # workers' gradients were dropped.)
    result = engine.simulate("backup_workers",
                             _cluster([0.01, 0.01, 0.01, 0.05]), 2000)
    fast = result.worker != 3
    self.assertTrue(np.all(result.accepted[fast]))
    self.assertTrue(np.all(result.tau[fast] == 0))
    self.assertFalse(np.any(result.accepted[~fast]))
    self.assertTrue(np.all(result.tau[~fast] >= 4))

  def test_every_global_step_aggregates_exactly_m(self):
    cluster = engine.ClusterModel(
        num_workers=8, compute=timing.ComputeModel(
            0.05, distribution="lognormal", sigma=0.5, fixed={2: 6.0}),
        serial_s=1e-4, add_s=2e-3, apply_s=4e-3, rpc_s=1e-3)
    result = engine.simulate("gba", cluster, 3000)
    counts = np.bincount(result.step[result.accepted])
    full = counts[:result.global_steps]
    self.assertLen(full, result.global_steps)
    self.assertTrue(np.all(full == 8), full)

  def test_bad_input_is_one_line_naming_the_value(self):
    with self.assertRaisesRegex(ValueError, r"^Received: mode='fast'"):
      engine.simulate("fast", _cluster([0.1]), 10)
    with self.assertRaisesRegex(ValueError, r"^Received: local_steps=0"):
      engine.simulate("gba", _cluster([0.1]), 0)
    with self.assertRaisesRegex(ValueError, r"^Received: serial_s=-1"):
      _cluster([0.1], serial_s=-1)
    with self.assertRaisesRegex(ValueError, r"^Received: sigma=-0.1"):
      timing.ComputeModel(0.1, sigma=-0.1)


class TimingTest(tf.test.TestCase):

  def test_episodes_slow_a_worker_for_the_time_they_last(self):
    model = timing.ComputeModel(0.1, episode_rate_per_hour=4.0,
                                episode_min_s=60, episode_max_s=600)
    clock = model.clocks(1, seed=3)[0]
    grid = np.arange(0, 200 * 3600.0, 10.0)
    factors = np.array([clock.slowdown(t) for t in grid])
    slow = factors > 1
    self.assertTrue(np.all((factors[slow] >= 2) & (factors[slow] <= 10)))
    # Share of time slowed: rate * mean length / (1 + rate * mean length),
    # mean length (600 - 60) / ln(10) = 234.5 s -> 0.2067.
    self.assertAllClose(slow.mean(), 0.2067, atol=0.03)
    self.assertAllClose(factors.mean(), model.mean_slowdown(), atol=0.15)


class AccuracyTest(tf.test.TestCase):

  def test_gba_in_lock_step_trains_exactly_as_sync(self):
    # Equal workers, no costs: every GBA gradient has tau = 0 and step s
    # holds pushes s*M .. s*M + M - 1, the batches sync's step s uses.
    cluster = _cluster([0.1] * 4)
    problem = accuracy.Problem(num_features=8)
    gba = engine.simulate("gba", cluster, 400)
    sync = engine.simulate("sync", cluster, 400)
    self.assertEqual(int(gba.tau.max()), 0)
    a = accuracy.train(gba, problem, 1.0)
    b = accuracy.train(sync, problem, 1.0)
    self.assertEqual(a["global_steps"], 100)
    self.assertEqual(a["auc"], b["auc"])
    self.assertEqual(a["logloss"], b["logloss"])
    # Async applies the same gradients one by one, on stale versions: not
    # the same model (the comparison can fail).
    c = accuracy.train(engine.simulate("async", cluster, 400), problem, 1.0)
    self.assertNotEqual(c["logloss"], b["logloss"])

  def test_training_approaches_the_known_best_auc(self):
    problem = accuracy.Problem(num_features=8)
    out = accuracy.train(engine.simulate("sync", _cluster([0.1] * 4), 2000),
                         problem, 1.0)
    self.assertGreater(out["auc"], out["best_auc"] - 0.01)


class CalibrationTest(tf.test.TestCase):

  def test_tv_distance_by_hand(self):
    # p = (0.5, 0.5, 0), q = (0, 0.5, 0.5): half of |p - q| summed = 0.5.
    self.assertAllClose(calibration.tv_distance([1, 1, 0], [0, 1, 1]), 0.5)
    self.assertAllClose(calibration.tv_distance([3, 1], [6, 2, 0]), 0.0)

  def test_fit_recovers_a_known_overhead(self):
    run = calibration.Measured(
        condition="healthy", mode="gba", num_workers=4, num_ps=2,
        local_batch_size=256, global_batch_size=1024, step_ms=50.0,
        stragglers={}, samples_per_s=0.0, staleness_histogram=None)
    truth = engine.simulate("gba", calibration.cluster_for(run, 0.06, 0.02),
                            800)
    run = calibration.Measured(**dict(
        vars(run), samples_per_s=truth.samples_per_s))
    self.assertAllClose(calibration.fit_overhead(run, 0.06, 800), 0.02,
                        atol=5e-4)

  def test_a_straggler_stretches_only_the_emulated_step(self):
    # --straggler=1:4 slows worker 1's input sleep (50 ms -> 200 ms), not
    # its compute after the token read, which the counters measure.
    run = calibration.Measured(
        condition="straggler", mode="gba", num_workers=2, num_ps=1,
        local_batch_size=8, global_batch_size=16, step_ms=50.0,
        stragglers={1: 4.0}, samples_per_s=1.0, staleness_histogram=None)
    cluster = calibration.cluster_for(run, 0.03, 0.0)
    self.assertEqual(cluster.compute.fixed, {})
    self.assertAllClose([cluster.input_time(0), cluster.input_time(1)],
                        [0.05, 0.2])


  def _traced(self, mode, **phases):
    base = dict(
        pushes=100, ticket_wait_s=0.001, land_s=0.010152,
        land_log_sd=0.7, apply_s=0.020152, apply_log_sd=0.6,
        claim_fraction=0.5,
        # Worker 1 is the straggler: its phases are left out.
        arrive_s=[0.0305, 0.5], arrive_log_sd=[0.0, 2.0],
        gap_s=[0.0405, 0.9], gap_log_sd=[0.3, 2.0])
    base.update(phases)
    return calibration.Measured(
        condition="healthy", mode=mode, num_workers=2, num_ps=2,
        local_batch_size=8, global_batch_size=16, step_ms=50.0,
        stragglers={1: 4.0}, samples_per_s=1.0, staleness_histogram=None,
        push_phases=base)

  def test_traced_costs_by_hand(self):
    # rpc 0.5 ms, scalar section 152 us (LOCAL_COSTS), 2 PS, M = 16 / 8 = 2.
    # sigma 0: base = arrive - rpc = 30 ms; overhead = gap - rpc = 40 ms;
    # land = 10.152 - 0.152 = 10 ms. A claim per 2 pushes is one claim per
    # step (M * 0.5 = 1): apply = (20.152 - 0.152) ms x 2 PS = 40 ms.
    costs = calibration.traced_costs(self._traced("gba"))
    self.assertAllClose(
        [costs[k] for k in ("base_s", "overhead_s", "land_s", "apply_s",
                            "sigma", "overhead_sigma", "land_sigma",
                            "apply_sigma")],
        [0.030, 0.040, 0.010, 0.040, 0.0, 0.3, 0.7, 0.6])
    # Bounded staleness applies every push (M = 1); claims by half of them
    # cover 2 steps each: per step (20.152 / 2 - 0.152) ms x 2 = 19.848 ms.
    costs = calibration.traced_costs(self._traced("bounded_staleness"))
    self.assertAllClose(costs["apply_s"], 0.019848)
    # A lognormal compute of shape 0.5 and mean arrive - rpc = 30 ms has
    # median 30 ms / exp(0.125).
    costs = calibration.traced_costs(self._traced(
        "gba", arrive_log_sd=[0.5, 2.0]))
    self.assertAllClose(costs["base_s"], 0.030 / np.exp(0.125))
    cluster = calibration.traced_cluster(self._traced("gba"), costs)
    self.assertEqual(cluster.jitter,
                     {"overhead": 0.3, "land": 0.7, "apply": 0.6})

  def test_several_seeds_give_the_mean_rate_and_the_summed_histogram(self):
    run = calibration.Measured("healthy", "gba", 2, 1, 8, 16, 0.0, {},
                               80.0, [5, 5])
    cluster = engine.ClusterModel(
        num_workers=2, num_ps=1, local_batch_size=8, global_batch_size=16,
        compute=timing.ComputeModel(0.1, distribution="lognormal",
                                    sigma=0.5))
    one = calibration.compare(run, cluster, 40)
    results = [engine.simulate("gba", cluster, 40, seed) for seed in (0, 1, 2)]
    three = calibration.compare(run, cluster, 40, seeds=3)
    self.assertEqual(three["seeds"], 3)
    self.assertAllClose(three["simulated_local_steps_per_s"],
                        np.mean([r.local_steps_per_s for r in results]))
    self.assertAllEqual(three["simulated_histogram"],
                        np.sum([r.staleness_histogram(2) for r in results],
                               axis=0))
    # Seed 0 alone is the first of them.
    self.assertAllClose(one["simulated_local_steps_per_s"],
                        results[0].local_steps_per_s)

  def test_a_run_without_a_trace_is_one_line(self):
    run = calibration.Measured(**dict(vars(self._traced("gba")),
                                      push_phases=None))
    with self.assertRaisesRegex(ValueError, r"Received: .*--trace_pushes"):
      calibration.traced_costs(run)


class SimTraceTest(tf.test.TestCase):

  def test_the_trace_has_the_runtimes_landmarks(self):
    # One worker, M = 1, fixed costs: overhead 50 ms before the token read,
    # compute 10 ms, landing 20 ms, apply 30 ms (one PS), rpc 0. Each push:
    # read at t, arrive t + 10 ms, ticket at once, landed t + 30 ms, claims
    # the apply, ends t + 60 ms; the next read at t + 110 ms.
    cluster = engine.ClusterModel(
        num_workers=1, compute=timing.ComputeModel(0.01), num_ps=1,
        local_batch_size=1, overhead_s=0.05, land_s=0.02, apply_s=0.03)
    result = engine.simulate("bounded_staleness", cluster, 20)
    rows = result.trace
    self.assertEqual(rows.shape, (20, len(push_trace.COLUMNS)))
    self.assertAllClose(rows[:3, push_trace.READ:push_trace.END + 1],
                        [[0.05, 0.06, 0.06, 0.08, 0.11],
                         [0.16, 0.17, 0.17, 0.19, 0.22],
                         [0.27, 0.28, 0.28, 0.30, 0.33]])
    # The trace's staleness is the result's; push_trace reads it as it
    # reads the runtime's.
    self.assertAllEqual(rows[:, push_trace.STEP] - rows[:, push_trace.TOKEN],
                        result.tau)
    p = push_trace.phases(rows, num_workers=1, warmup_fraction=0.0)
    self.assertAllClose([p["arrive_s"][0], p["land_s"], p["apply_s"],
                         p["gap_s"][0], p["claim_fraction"]],
                        [0.01, 0.02, 0.03, 0.05, 1.0])

  def test_an_add_does_not_wait_for_an_apply(self):
    # Two workers, M = 1, one PS: worker 0 arrives at 10 ms, adds for 4 ms
    # and lands at 14 ms, then applies step 0 until 114 ms. Worker 1 arrives
    # at 20 ms with step 1's ticket: its add runs beside the apply (another
    # buffer parity; the runtime runs both at once) and lands at 24 ms, not
    # after the apply at 118 ms.
    cluster = _cluster([0.01, 0.02], num_ps=1, local_batch_size=1,
                       global_batch_size=1, add_s=0.004, apply_s=0.1)
    rows = engine.simulate("gba", cluster, 2).trace
    first = {int(r[push_trace.WORKER]): r for r in rows[::-1]}
    self.assertAllClose(first[0][push_trace.LANDED], 0.014)
    self.assertAllClose(first[1][[push_trace.TICKET, push_trace.LANDED]],
                        [0.02, 0.024])


class LoopTest(tf.test.TestCase):
  """Training loops: Keras' fit joins every step at an epoch's end."""

  # Two workers computing 10 and 20 ms after 50 ms of dispatch, M = 1 with
  # no PS cost (each push applies its own step at once), loops of 4 local
  # steps and 0.5 s between them. Loop 0:
  # both read at .05; w0 ends .06, reads .11, ends .12; w1 ends .07, reads
  # .12, ends .14. The loop's 4 steps have started: w0 waits; w1's end at
  # .14 is the loop's last, so both start again at .14 + .5 and read at
  # .69. Within a loop each worker's gap (end to next read) is .05; the
  # loop's end is .69 - .14 = .55: the pause and one dispatch.
  def _run(self, loop_steps=4):
    cluster = _cluster([0.01, 0.02], num_ps=1, local_batch_size=1,
                       overhead_s=0.05, loop_steps=loop_steps,
                       loop_pause_s=0.5)
    return engine.simulate("bounded_staleness", cluster, 12).trace

  def test_the_workers_start_each_loop_together_after_the_pause(self):
    rows = self._run()
    reads = np.sort(rows[:, push_trace.READ])
    self.assertAllClose(reads[:6], [0.05, 0.05, 0.11, 0.12, 0.69, 0.69])
    # Without loops, w0's third read is at .12 + .05, w1's at .14 + .05.
    self.assertAllClose(np.sort(self._run(0)[:, push_trace.READ])[:6],
                        [0.05, 0.05, 0.11, 0.12, 0.17, 0.19])
    # The trace reads back as the runtime's does: gaps within loops, and
    # the loops' ends.
    p = push_trace.phases(rows, num_workers=2, warmup_fraction=0.0,
                          loop_steps=4)
    self.assertAllClose(p["gap_s"], [0.05, 0.05])
    self.assertAllClose(p["loop_pause_s"], 0.55)

  def test_calibration_reads_the_loops_from_a_trace(self):
    rows = self._run()
    row = {"condition": "healthy", "mode": "gba", "repeat": 0,
           "args": ["--straggler="],
           "config": {"num_workers": 2, "num_ps": 1, "step_ms": 0.0,
                      "global_batch_size": 2, "steps_per_loop": 2,
                      "gba": {"local_batch_size": 1}},
           "samples_per_s": 20.0, "staleness_histogram": [1],
           "push_phases": None}
    # 2 global steps of 2 local steps per loop.
    run = calibration.Measured.from_row(row, rows)
    self.assertEqual(run.loop_steps, 4)
    costs = calibration.traced_costs(run, rpc_s=0.0)
    # The pause less one dispatch: .55 - .05.
    self.assertAllClose(costs["loop_pause_s"], 0.5)
    self.assertAllClose(costs["overhead_s"], 0.05)
    cluster = calibration.traced_cluster(run, costs)
    self.assertEqual((cluster.loop_steps, cluster.loop_pause_s), (4, 0.5))
    # Kept beside the JSON, by condition-mode-repeat.
    path = os.path.join(self.get_temp_dir(), "calib.json")
    np.savez_compressed(path[:-5] + "_traces.npz",
                        **{calibration.trace_key(row): rows})
    traces = calibration.load_traces(path)
    self.assertAllClose(traces["healthy-gba-r0"], rows)
    self.assertEqual(calibration.load_traces(
        os.path.join(self.get_temp_dir(), "other.json")), {})

  def test_bad_loop_steps_is_one_line(self):
    with self.assertRaisesRegex(ValueError, r"Received: loop_steps=-2"):
      _cluster([0.01], loop_steps=-2)
    with self.assertRaisesRegex(ValueError, r"Received: loop_pause_s=-1"):
      _cluster([0.01], loop_pause_s=-1.0)


class JitterTest(tf.test.TestCase):

  def test_jitter_keeps_the_mean_and_spreads_the_cost(self):
    # One worker, M = 1: each local step is overhead 50 ms + compute 10 ms +
    # landing 20 ms (+ an apply of 0): 80 ms. Jitter of mean 1 on the
    # overhead and the landing keeps the mean step (12.5 steps/s) and makes
    # the steps unequal.
    compute = timing.ComputeModel(0.01)
    constant = engine.ClusterModel(
        num_workers=1, compute=compute, num_ps=1, local_batch_size=1,
        overhead_s=0.05, land_s=0.02)
    jittered = engine.ClusterModel(**dict(
        vars(constant), jitter={"overhead": 0.5, "land": 0.5}))
    steady = engine.simulate("bounded_staleness", constant, 4000)
    noisy = engine.simulate("bounded_staleness", jittered, 4000)
    self.assertAllClose(steady.local_steps_per_s, 12.5)
    self.assertAllClose(noisy.local_steps_per_s, 12.5, rtol=0.03)
    self.assertAllClose(np.std(np.diff(steady.time)), 0.0, atol=1e-9)
    self.assertGreater(np.std(np.diff(noisy.time)), 0.01)

  def test_bad_jitter_is_one_line(self):
    with self.assertRaisesRegex(ValueError, r"Received: jitter=.*'push'"):
      engine.ClusterModel(num_workers=1, compute=timing.ComputeModel(0.01),
                          jitter={"push": 0.5})


class InputPipelineTest(tf.test.TestCase):

  def test_a_slow_input_pipeline_sets_the_pace_one_batch_ahead(self):
    # Compute 30 ms after the token read, input 50 ms (worker 0) and 200 ms
    # (worker 1) per batch, one batch ahead: each worker delivers at the
    # slower of the two, 1/0.05 + 1/0.2 = 25 local steps/s without costs,
    # and the token-to-push time stays the compute's 30 ms.
    cluster = engine.ClusterModel(
        num_workers=2, compute=timing.ComputeModel(0.03), input_s=0.05,
        input_slowdown={1: 4.0})
    result = engine.simulate("async", cluster, 4000)
    self.assertAllClose(result.local_steps_per_s, 25.0, rtol=0.01)
    self.assertAllClose(result.ideal_local_steps_per_s, 25.0, rtol=1e-6)
    sync = engine.simulate("sync", cluster, 2000)
    # Sync: every step waits for worker 1's 200 ms batch.
    self.assertAllClose(sync.local_steps_per_s, 2 / 0.2, rtol=0.01)

  def test_a_worker_waiting_for_input_computes_on_the_token_it_read_first(
      self):
    # Async, no costs. Worker 0 computes 10 ms (input 1 ms: never waits);
    # worker 1 computes 5 ms but its batch is ready only every 100 ms. The
    # step reads its token as it starts, concurrently with the input:
    #   t=0      w1 reads token 0, waits for its batch until t=0.1
    #   t=0.105  w1 pushes; w0 pushed at 0.01, ..., 0.10: tau 10
    #   t=0.105  w1 reads token 11 (its own push applied), waits until 0.2,
    #            pushes at 0.205 after w0's at 0.11, ..., 0.20: tau 10.
    # Read after the wait (the other order), both would be tau 0.
    cluster = engine.ClusterModel(
        num_workers=2, compute=timing.ComputeModel(0.005, fixed={0: 2.0}),
        input_s=0.001, input_slowdown={1: 100.0})
    result = engine.simulate("async", cluster, 30)
    self.assertEqual(result.tau[result.worker == 1][:2].tolist(), [10, 10])
    self.assertEqual(result.token[result.worker == 1][:2].tolist(), [0, 11])


class SimulateBinaryTest(tf.test.TestCase):

  def test_sweep_writes_json_and_png(self):
    out = self.get_temp_dir()
    proc = subprocess.run(
        [sys.executable, os.path.join(testing_utils.ROOT, "scripts",
                                      "simulate.py"),
         "--workers=8,64", "--modes=sync,async,gba", f"--out_dir={out}",
         "--local_steps_per_worker=20"],
        capture_output=True, text=True, timeout=300)
    self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
    with open(os.path.join(out, "simulation.json")) as f:
      data = json.load(f)
    rows = {(r["num_workers"], r["mode"]): r for r in data["rows"]}
    self.assertLen(rows, 6)
    for n in (8, 64):
      self.assertEqual(rows[(n, "sync")]["staleness_max"], 0)
      self.assertGreater(rows[(n, "async")]["staleness_p50"], 0)
      self.assertIn("test_auc", rows[(n, "gba")])
    self.assertTrue(os.path.getsize(os.path.join(out, "simulation.png")))

  def _calibration_file(self, trace_healthy_gba=True, speeds=(100.0,)):
    """A gba-benchmark JSON of 4 cases: GBA and plain async, healthy and
    with worker 1 at 1/4 speed, 2 workers + 1 PS; the GBA runs traced.
    One run per case and entry of `speeds` (samples/s), repeat-major."""
    phases = dict(pushes=100, ticket_wait_s=0.0005, land_s=0.010,
                  land_log_sd=0.5, apply_s=0.010, apply_log_sd=0.5,
                  claim_fraction=0.5, arrive_s=[0.03, 0.03],
                  arrive_log_sd=[0.3, 0.3], gap_s=[0.02, 0.02],
                  gap_log_sd=[0.3, 0.3])
    runs = []
    for speed, (condition, straggler), mode in itertools.product(
        speeds, (("healthy", ""), ("straggler", "1:4")), ("gba", "async")):
      traced = mode == "gba" and (trace_healthy_gba
                                  or condition == "straggler")
      runs.append({
          "condition": condition, "mode": mode,
          "args": [f"--straggler={straggler}"],
          "config": {"num_workers": 2, "num_ps": 1, "step_ms": 50.0,
                     "global_batch_size": 16, "steps_per_loop": 25,
                     "gba": {"local_batch_size": 8}},
          "samples_per_s": speed,
          "staleness_histogram": [5, 5] if mode == "gba" else None,
          "worker_mean_step_seconds": None,
          "push_phases": phases if traced else None})
    path = os.path.join(self.get_temp_dir(), "calib.json")
    with open(path, "w") as f:
      json.dump({"runs": runs}, f)
    return path

  def test_calibrate_takes_traced_costs_and_fits_only_the_untraced(self):
    from gba_tf.bin import simulate  # pylint: disable=g-import-not-at-top
    rows = {(r["condition"], r["mode"]): r
            for r in simulate.calibrate([self._calibration_file()])["rows"]}
    self.assertLen(rows, 4)
    # GBA's costs are its trace's (gap 20 ms - rpc 0.5 ms), nothing fitted:
    # its healthy throughput is a prediction, so not 100 samples/s exactly.
    gba = rows[("healthy", "gba")]
    self.assertEqual((gba["costs_from"], gba["fitted_throughput"]),
                     ("measured", False))
    self.assertAllClose(gba["costs"]["overhead_s"], 0.0195)
    self.assertNotAlmostEqual(gba["throughput_error"], 0.0, places=3)
    self.assertIn("tv_distance", gba)
    # Plain async has no trace: its healthy throughput is fitted.
    fitted = rows[("healthy", "async")]
    self.assertEqual((fitted["costs_from"], fitted["fitted_throughput"]),
                     ("fitted", True))
    self.assertAllClose(fitted["throughput_error"], 0.0, atol=0.01)
    self.assertFalse(rows[("straggler", "async")]["fitted_throughput"])

  def test_calibrate_pools_repeats(self):
    from gba_tf.bin import simulate  # pylint: disable=g-import-not-at-top
    # Three repeats at 100, 55 and 40 samples/s: the median, 55, is the
    # measurement (not the mean, 65, nor the first or the last run).
    path = self._calibration_file(speeds=(100.0, 55.0, 40.0))
    rows = {(r["condition"], r["mode"]): r
            for r in simulate.calibrate([path])["rows"]}
    self.assertLen(rows, 4)
    gba = rows[("healthy", "gba")]
    self.assertEqual(gba["repeats"], 3)
    # 8 samples per local step: 55 / 8.
    self.assertAllClose(gba["measured_local_steps_per_s"], 55.0 / 8)
    self.assertAllClose(gba["measured_runs_local_steps_per_s"],
                        [12.5, 6.875, 5.0])
    # The histograms [5, 5] of the three repeats, summed.
    self.assertEqual(gba["measured_histogram"], [15, 15])
    # Plain async is fitted to the median throughput.
    self.assertAllClose(rows[("healthy", "async")]["throughput_error"], 0.0,
                        atol=0.01)
    self.assertAllClose(rows[("healthy", "async")][
        "measured_local_steps_per_s"], 55.0 / 8)

  def test_pool_refuses_different_cases(self):
    run = calibration.Measured("healthy", "gba", 2, 1, 8, 16, 50.0, {},
                               100.0, [5, 5])
    with self.assertRaisesRegex(ValueError, "Received: runs of different "
                                "cases to pool"):
      calibration.pool([run, dataclasses.replace(run, mode="async")])

  def test_calibrate_needs_a_traced_healthy_gba_run(self):
    from gba_tf.bin import simulate  # pylint: disable=g-import-not-at-top
    with self.assertRaisesRegex(ValueError, "Received: no healthy GBA run "
                                "traced with --trace_pushes for 2 workers"):
      simulate.calibrate([self._calibration_file(trace_healthy_gba=False)])

  def test_bad_flag_is_one_line(self):
    proc = subprocess.run(
        [sys.executable, os.path.join(testing_utils.ROOT, "scripts",
                                      "simulate.py"), "--workers=8,x"],
        capture_output=True, text=True, timeout=300)
    self.assertEqual(proc.returncode, 2)
    self.assertEqual(proc.stderr.strip().splitlines()[-1],
                     "simulate.py: error: Received: --workers=8,x, which "
                     "must be positive integers.")


if __name__ == "__main__":
  tf.test.main()
