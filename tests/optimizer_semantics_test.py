"""Optimizer features keep synchronous semantics under GBA (or are refused).

Each equivalence test trains the same model twice from the same weights:
once in one process on each global batch (the synchronous reference), once
with GBAStrategy on real in-process servers (2 workers, 2 PS, variables
split over both), its local steps serialized so that every staleness is 0.
GBA must match the reference to 1e-5; each test also checks that the
feature under test really changes the result (the comparison is not of two
runs the feature leaves alone).
"""

import time

import numpy as np
from absl.testing import parameterized

import gba_tf  # sets TF_USE_LEGACY_KERAS=1 before TensorFlow loads
import tensorflow as tf
import tensorflow_recommenders as tfrs

from tests import testing_utils

_PS0 = "/job:ps/replica:0/task:0/device:CPU:0"
_VOCAB = 100
_M, _LOCAL, _STEPS = 3, 8, 4


def _model(constraint=None, seed=1):
  ids = tf.keras.Input(shape=(3,), dtype=tf.int64)
  emb = tf.keras.layers.Embedding(
      _VOCAB, 4, embeddings_initializer=tf.keras.initializers.RandomUniform(
          -0.1, 0.1, seed=seed))(ids)
  x = tf.keras.layers.Flatten()(emb)
  x = tf.keras.layers.Dense(8, activation="relu", kernel_constraint=constraint,
                            kernel_initializer=tf.keras.initializers.
                            RandomUniform(-0.5, 0.5, seed=seed + 1))(x)
  out = tf.keras.layers.Dense(1, kernel_initializer=tf.keras.initializers.
                              GlorotUniform(seed=seed + 2))(x)
  return tf.keras.Model(ids, out)


def _params(model):
  """Whole (possibly sharded) weights, layer by layer, as numpy."""
  return [tf.convert_to_tensor(w).numpy()
          for w in testing_utils.layer_weights(model)]


def _split(model):
  """(embedding variables, dense variables) of `model`, shards included."""
  emb = [v for v in model.trainable_variables if "embedding" in v.name]
  dense = [v for v in model.trainable_variables if "embedding" not in v.name]
  return emb, dense


def _data(seed=7):
  """`_STEPS` global batches; ids never repeat within a global batch.

  tf_keras clips a sparse gradient on its values before summing repeated
  rows, GBA on the summed rows; with distinct ids the two are the same
  tensor, so clipping is compared exactly (README, optimizer table).
  """
  rng = np.random.default_rng(seed)
  hidden = np.random.default_rng(0).normal(size=_VOCAB)
  ids = np.concatenate([
      rng.permutation(_VOCAB)[:_M * _LOCAL * 3].reshape(_M * _LOCAL, 3)
      for _ in range(_STEPS)]).astype(np.int64)
  y = (hidden[ids].sum(1) > 0).astype(np.float32)[:, None]
  return ids, y


_bce = tf.keras.losses.BinaryCrossentropy(
    from_logits=True, reduction=tf.keras.losses.Reduction.NONE)


def _loss(y, logits):
  # Mean over the batch: GBA's mean of M local means is the global mean.
  return tf.reduce_mean(_bce(y, logits))


def _single_process(make_optimizers, apply, constraint=None,
                    after_global_step=None):
  """The synchronous reference: one process, one step per global batch.

  `after_global_step(optimizers, k)` runs after global step k (1-based).
  """
  ids, y = _data()
  model = _model(constraint)
  optimizers = make_optimizers(model)
  g = _M * _LOCAL
  for k in range(_STEPS):
    with tf.GradientTape() as tape:
      loss = _loss(y[k * g:(k + 1) * g], model(ids[k * g:(k + 1) * g]))
    grads = tape.gradient(loss, model.trainable_variables)
    apply(optimizers, model, grads)
    if after_global_step is not None:
      after_global_step(optimizers, k + 1)
  return _params(model), optimizers


def _gba(make_optimizers, apply, constraint=None, local_steps=_M * _STEPS,
         after_global_step=None):
  """GBA over 2 workers and 2 PS, local steps serialized; returns params.

  `after_global_step(optimizers, k)` runs once global step k is applied.
  """
  ids, y = _data()
  config = gba_tf.GBAConfig(global_batch_size=_M * _LOCAL,
                            local_batch_size=_LOCAL)
  strategy = gba_tf.GBAStrategy(testing_utils.shared_cluster().resolver(),
                                config, testing_utils.two_shards())
  coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)
  with strategy.scope():
    model = _model(constraint)
    optimizers = make_optimizers(model)
  # Same starting point: sharded initialisation draws per shard.
  for v, v0 in zip(testing_utils.layer_weights(model),
                   _params(_model(constraint))):
    v.assign(v0)

  @tf.function
  def step(x, t):
    def replica_fn(x, t):
      with tf.GradientTape() as tape:
        loss = _loss(t, model(x))
      grads = tape.gradient(loss, model.trainable_variables)
      apply(optimizers, model, grads)
    strategy.run(replica_fn, args=(x, t))

  for j in range(local_steps):
    sl = slice(j * _LOCAL, (j + 1) * _LOCAL)
    coordinator.schedule(step, args=(tf.constant(ids[sl]),
                                     tf.constant(y[sl]))).fetch()
    if after_global_step is not None and (j + 1) % _M == 0:
      after_global_step(optimizers, (j + 1) // _M)
  return _params(model), optimizers, strategy


def _one(optimizer_fn):
  return (lambda model: optimizer_fn(),
          lambda opt, model, grads: opt.apply_gradients(
              zip(grads, model.trainable_variables)))


def _two_optimizers():
  """Adagrad on the embedding, Adam on the dense tower: two calls."""
  def make(model):
    del model
    return (tf.keras.optimizers.Adagrad(0.5), tf.keras.optimizers.Adam(0.05))

  def apply(opts, model, grads):
    emb, _ = _split(model)
    names = {v.name for v in emb}
    pairs = list(zip(grads, model.trainable_variables))
    opts[0].apply_gradients([(g, v) for g, v in pairs if v.name in names])
    opts[1].apply_gradients([(g, v) for g, v in pairs
                             if v.name not in names])
  return make, apply


def _composite():
  """tfrs' CompositeOptimizer: legacy Adagrad + legacy Adam."""
  def make(model):
    return tfrs.experimental.optimizers.CompositeOptimizer([
        (tf.keras.optimizers.legacy.Adagrad(0.5), lambda: _split(model)[0]),
        (tf.keras.optimizers.legacy.Adam(0.05), lambda: _split(model)[1])])

  def apply(opt, model, grads):
    opt.apply_gradients(zip(grads, model.trainable_variables))
  return make, apply


class SyncEquivalenceTest(tf.test.TestCase, parameterized.TestCase):

  def assert_same_params(self, got, want):
    for g, w in zip(got, want):
      self.assertAllClose(g, w, atol=1e-5, rtol=1e-5)

  def test_two_optimizers_in_a_custom_loop(self):
    make, apply = _two_optimizers()
    want, _ = _single_process(make, apply)
    got, opts, _ = _gba(make, apply)
    self.assert_same_params(got, want)
    # Each optimizer stepped once per global step, on its own variables.
    self.assertEqual([o.iterations.numpy() for o in opts], [_STEPS, _STEPS])
    init = _params(_model())
    self.assertGreater(np.abs(want[0] - init[0]).max(), 1e-3)
    self.assertGreater(np.abs(want[1] - init[1]).max(), 1e-3)

  def test_tfrs_composite_optimizer(self):
    make, apply = _composite()
    want, _ = _single_process(make, apply)
    got, opt, _ = _gba(make, apply)
    self.assert_same_params(got, want)
    self.assertEqual([o.iterations.numpy() for o in opt.optimizers],
                     [_STEPS, _STEPS])

  @parameterized.named_parameters(
      ("clipnorm", lambda: tf.keras.optimizers.Adam(0.05, clipnorm=0.05)),
      ("global_clipnorm",
       lambda: tf.keras.optimizers.Adam(0.05, global_clipnorm=0.05)),
      ("clipvalue", lambda: tf.keras.optimizers.SGD(5.0, clipvalue=0.004)),
      ("legacy_clipnorm",
       lambda: tf.keras.optimizers.legacy.SGD(5.0, clipnorm=0.05)),
      ("legacy_global_clipnorm",
       lambda: tf.keras.optimizers.legacy.SGD(5.0, global_clipnorm=0.05)),
  )
  def test_clipping_applies_to_the_global_batch_gradient(self, optimizer_fn):
    make, apply = _one(optimizer_fn)
    want, _ = _single_process(make, apply)
    got, _, _ = _gba(make, apply)
    self.assert_same_params(got, want)
    # The clip binds: without it the reference ends elsewhere.
    unclipped = optimizer_fn().get_config()
    for key in ("clipnorm", "global_clipnorm", "clipvalue"):
      unclipped[key] = None
    plain, _ = _single_process(*_one(
        lambda: type(optimizer_fn()).from_config(unclipped)))
    self.assertGreater(max(np.abs(p - w).max() for p, w in zip(plain, want)),
                       1e-3)

  def test_learning_rate_changed_between_global_steps(self):
    # A callback (ReduceLROnPlateau, a user's) assigns a constant rate's
    # variable; GBA reads it once per global step, at the apply, so the new
    # rate takes effect from the next global step, as in sync.
    def lower_after_two(opt, k):
      if k == 2:
        opt.learning_rate.assign(0.005)

    make, apply = _one(lambda: tf.keras.optimizers.Adagrad(0.5))
    want, _ = _single_process(make, apply, after_global_step=lower_after_two)
    got, opt, _ = _gba(make, apply, after_global_step=lower_after_two)
    self.assert_same_params(got, want)
    self.assertAllClose(opt.learning_rate.numpy(), 0.005)
    # The change binds: at the old rate the reference ends elsewhere.
    unchanged, _ = _single_process(make, apply)
    self.assertGreater(
        max(np.abs(u - w).max() for u, w in zip(unchanged, want)), 1e-3)

  def test_constraint_projects_after_each_global_step_only(self):
    nonneg = tf.keras.constraints.NonNeg()
    make, apply = _one(lambda: tf.keras.optimizers.SGD(1.0))
    want, _ = _single_process(make, apply, constraint=nonneg)
    got, _, _ = _gba(make, apply, constraint=nonneg)
    self.assert_same_params(got, want)
    # The dense kernel starts half negative; the projection bound it.
    init = _params(_model())
    self.assertLess(init[1].min(), -0.1)
    self.assertGreaterEqual(want[1].min(), 0.0)
    # One local step of M = 3 applies nothing: sync has taken no step yet,
    # so the kernel keeps its negative entries (a projection in the local
    # step would zero them, and race other workers' applies).
    pending, _, strategy = _gba(make, apply, constraint=nonneg,
                                local_steps=1)
    self.assertEqual(strategy.gba_metrics()["pending"], 1)
    self.assertAllEqual(pending[1], init[1])


class _HeldSchedule(tf.keras.optimizers.schedules.LearningRateSchedule):
  """Rate 1.0 at step 0, then 0.5; a local step can be held inside it.

  In a local step (replica context), when `armed` holds an item, the
  schedule reads the step, then waits on `gate` before returning the rate:
  the rate a local step computes can then arrive after global steps it did
  not see. At apply time (cross-replica context) it never waits.
  """

  def __init__(self, armed, started, gate):
    self.armed, self.started, self.gate = armed, started, gate

  def __call__(self, step):
    rate = tf.where(tf.cast(step, tf.int64) > 0, 0.5, 1.0)
    if tf.distribute.in_cross_replica_context():
      return rate

    def wait():
      with tf.control_dependencies([self.armed.dequeue(), rate]):
        with tf.control_dependencies([self.started.enqueue(1.0)]):
          return self.gate.dequeue()

    held = tf.cond(self.armed.size() > 0, wait, lambda: tf.constant(1.0))
    with tf.control_dependencies([held]):
      return tf.identity(rate)

  def get_config(self):
    return {}


class HeldPushTest(tf.test.TestCase, parameterized.TestCase):
  """A push held across an apply is applied with global-step state."""

  def _run(self, optimizer_fn):
    # M = 2; no decay for tau <= 4, so the held push counts fully. The loss
    # is <g, w>: gradients do not depend on the weights, so staleness
    # changes only which step a gradient joins.
    config = gba_tf.GBAConfig(global_batch_size=2, local_batch_size=1,
                              staleness_threshold=4)
    strategy = gba_tf.GBAStrategy(testing_utils.shared_cluster().resolver(),
                                  config)
    coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)
    with tf.device(_PS0):
      armed = tf.queue.FIFOQueue(4, tf.float32, shapes=[[]])
      # One queue per wait: ops on one queue run in program order, so a
      # shared queue would chain the two waits.
      started = tf.queue.FIFOQueue(4, tf.float32, shapes=[[]])
      rate_started = tf.queue.FIFOQueue(4, tf.float32, shapes=[[]])
      rate_gate = tf.queue.FIFOQueue(4, tf.float32, shapes=[[]])
      forward_gate = tf.queue.FIFOQueue(4, tf.float32, shapes=[[]])
    schedule = _HeldSchedule(armed, rate_started, rate_gate)
    with strategy.scope():
      w = tf.Variable(tf.zeros([2]), name="w")
      optimizer = optimizer_fn(schedule)

    @tf.function
    def step(g, hold):
      def replica_fn(g, hold):
        def wait():
          with tf.control_dependencies([started.enqueue(1.0)]):
            return forward_gate.dequeue()
        x = tf.cond(hold, wait, lambda: tf.constant(1.0))
        with tf.GradientTape() as tape:
          loss = x * tf.reduce_sum(w * g)
        optimizer.apply_gradients([(tape.gradient(loss, w), w)])
      strategy.run(replica_fn, args=(g, hold))

    def run(g, hold=False):
      return coordinator.schedule(step, args=(
          tf.constant(g, tf.float32), tf.constant(hold)))

    # H reads its token and the rate of step 0, then waits twice: inside
    # the schedule (before its rate reaches the optimizer) and in its
    # forward pass (before its push).
    armed.enqueue(1.0)
    held = run([1.0, 3.0], hold=True)
    started.dequeue()
    rate_started.dequeue()
    run([2.0, 0.0]).fetch()   # F1, F2: global step 0, rate 1.0
    run([0.0, 2.0]).fetch()
    run([4.0, 4.0]).fetch()   # F3 joins step 1
    # H's rate (1.0, of step 0) lands now, after step 0 was applied.
    rate_gate.enqueue(1.0)
    deadline = time.monotonic() + 60
    while (_reported_rate(optimizer) != 1.0 and time.monotonic() < deadline):
      time.sleep(0.05)
    forward_gate.enqueue(1.0)  # H completes step 1 (tau = 1).
    held.fetch()
    return w.numpy(), optimizer, strategy

  @parameterized.named_parameters(
      ("new_sgd", lambda lr: tf.keras.optimizers.SGD(lr)),
      ("legacy_sgd", lambda lr: tf.keras.optimizers.legacy.SGD(lr)),
  )
  def test_schedule_is_evaluated_at_the_global_step(self, optimizer_fn):
    w, optimizer, strategy = self._run(optimizer_fn)
    # Step 0: -1.0 * mean(F1, F2) = -[1, 1]; step 1, at rate 0.5:
    # -0.5 * mean(F3, H) = -0.5 * [2.5, 3.5]. w = [-2.25, -2.75]. With the
    # rate H computed in its local step (1.0): [-3.5, -4.5].
    self.assertAllClose(w, [-2.25, -2.75])
    self.assertEqual(optimizer.iterations.numpy(), 2)
    self.assertEqual(strategy.gba_metrics()["staleness_histogram"][1], 1)

  def test_legacy_adam_bias_correction_at_the_global_step(self):
    w, optimizer, _ = self._run(
        lambda lr: tf.keras.optimizers.legacy.Adam(lr, epsilon=1e-7))
    # Legacy Adam, by hand (b1 = 0.9, b2 = 0.999), per coordinate, with the
    # schedule's rate: step t uses lr_t * sqrt(1 - b2^t) / (1 - b1^t) *
    # m_t / (sqrt(v_t) + eps).
    want = np.zeros(2)
    m = v = np.zeros(2)
    for t, (lr, g) in enumerate([(1.0, np.array([1.0, 1.0])),
                                 (0.5, np.array([2.5, 3.5]))], start=1):
      m = 0.9 * m + 0.1 * g
      v = 0.999 * v + 0.001 * g * g
      want -= (lr * np.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t)
               * m / (np.sqrt(v) + 1e-7))
    self.assertAllClose(w, want, atol=1e-5)
    self.assertEqual(optimizer.iterations.numpy(), 2)


def _reported_rate(optimizer) -> float:
  """The learning rate the optimizer reports now (its variable)."""
  rate = getattr(optimizer, "_current_learning_rate", None)
  if rate is None:  # legacy: no rate variable; nothing to wait for
    return 1.0
  return float(rate.numpy())


class RefusedTest(tf.test.TestCase):

  def _strategy(self):
    config = gba_tf.GBAConfig(global_batch_size=2, local_batch_size=1)
    return gba_tf.GBAStrategy(testing_utils.shared_cluster().resolver(),
                              config)

  def _step_error(self, strategy, update):
    coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)
    with strategy.scope():
      w = tf.Variable([1.0, 2.0])

    @tf.function
    def step():
      def replica_fn():
        with tf.GradientTape() as tape:
          loss = tf.reduce_sum(w * w)
        update([(tape.gradient(loss, w), w)])
      strategy.run(replica_fn)

    with self.assertRaises(ValueError) as caught:
      coordinator.schedule(step).fetch()
    self.assertAllEqual(w.numpy(), [1.0, 2.0])
    return str(caught.exception).strip().splitlines()[-1]

  def test_keras3_optimizer(self):
    import keras  # pylint: disable=g-import-not-at-top
    strategy = self._strategy()
    with strategy.scope():
      opt = keras.optimizers.SGD(0.1)
    message = self._step_error(strategy, opt.apply_gradients)
    self.assertRegex(message.strip(),
                     r"^ValueError: Received: a Keras 3 object \(SGD\)")

  def test_unrecognized_optimizer_merge_function(self):

    class HomeMadeOptimizer:
      def apply_gradients(self, grads_and_vars):
        return tf.distribute.get_replica_context().merge_call(
            self._apply, args=(grads_and_vars,))

      def _apply(self, strategy, grads_and_vars):
        for g, v in grads_and_vars:
          strategy.extended.update(v, lambda v, g: v.assign_sub(g), (g,))

    message = self._step_error(self._strategy(),
                               HomeMadeOptimizer().apply_gradients)
    self.assertIn("Received: HomeMadeOptimizer, an optimizer whose merge "
                  "function '_apply'", message)

  def test_weight_decay_without_an_apply(self):
    strategy = self._strategy()
    with strategy.scope():
      opt = tf.keras.optimizers.SGD(0.1, weight_decay=0.1)
    message = self._step_error(
        strategy, lambda gv: opt._apply_weight_decay([v for _, v in gv]))  # pylint: disable=protected-access
    self.assertIn("Received: 1 weight-decay call(s) with no optimizer apply",
                  message)

  def test_clipping_with_skipped_aggregation(self):
    strategy = self._strategy()
    with strategy.scope():
      opt = tf.keras.optimizers.SGD(0.1, clipnorm=1.0)
    message = self._step_error(
        strategy, lambda gv: opt.apply_gradients(
            gv, skip_gradients_aggregation=True))
    self.assertIn("Received: clipnorm=1.0 on SGD with gradients that "
                  "skipped `aggregate_gradients`", message)


if __name__ == "__main__":
  tf.test.main()
