"""Tests of GBAConfig validation, presets and round trips."""

from absl.testing import parameterized

import gba_tf
import tensorflow as tf

from gba_tf import config as config_lib


class GBAConfigTest(tf.test.TestCase, parameterized.TestCase):

  def test_num_aggregate(self):
    self.assertEqual(
        gba_tf.GBAConfig(global_batch_size=1024,
                         local_batch_size=256).num_aggregate, 4)

  @parameterized.named_parameters(
      ("not_multiple", dict(global_batch_size=100, local_batch_size=64),
       "Received: global_batch_size=100, which is not a multiple of "
       "local_batch_size=64"),
      ("zero_local", dict(local_batch_size=0), "local_batch_size=0"),
      ("float_global", dict(global_batch_size=12.5), "global_batch_size=12.5"),
      ("negative_threshold", dict(staleness_threshold=-1),
       "staleness_threshold=-1"),
      ("unknown_decay", dict(decay="cosine"), "decay='cosine'"),
      ("bad_limit", dict(max_staleness=-1), "max_staleness=-1"),
      ("bad_name", dict(name="hogwild"), "name='hogwild'"),
      ("bad_normalize", dict(normalize="mean"),
       "Received: normalize='mean', which is not one of"),
  )
  def test_rejects_bad_values_with_one_line(self, kwargs, message):
    with self.assertRaises(ValueError) as ctx:
      gba_tf.GBAConfig(**kwargs)
    self.assertIn(message, str(ctx.exception))
    self.assertNotIn("\n", str(ctx.exception))

  def test_presets(self):
    preset = gba_tf.GBAConfig.preset
    gba = preset("gba", global_batch_size=512, local_batch_size=128)
    self.assertEqual(gba.num_aggregate, 4)
    self.assertEqual(gba.decay, "exponential")

    asyn = preset("async", local_batch_size=128)
    self.assertEqual((asyn.num_aggregate, asyn.decay, asyn.max_staleness),
                     (1, "none", None))

    sync_ps = preset("sync_ps", local_batch_size=128, num_workers=4)
    self.assertEqual((sync_ps.num_aggregate, sync_ps.max_staleness), (4, 0))

    # 4 workers, 1 backup: aggregate 3, drop any stale gradient.
    backup = preset("backup_workers", local_batch_size=128, num_workers=4,
                    backup_workers=1)
    self.assertEqual((backup.num_aggregate, backup.max_staleness), (3, 0))

    ssp = preset("bounded_staleness", local_batch_size=128, max_staleness=3)
    self.assertEqual((ssp.num_aggregate, ssp.max_staleness, ssp.decay),
                     (1, 3, "none"))

  @parameterized.named_parameters(
      ("unknown", dict(name="ssp", local_batch_size=8), "preset='ssp'"),
      ("gba_needs_global", dict(name="gba", local_batch_size=8),
       "global_batch_size=None"),
      ("sync_needs_workers", dict(name="sync_ps", local_batch_size=8),
       "num_workers=None"),
      ("too_many_backups", dict(name="backup_workers", local_batch_size=8,
                                num_workers=2, backup_workers=2),
       "backup_workers=2"),
  )
  def test_preset_rejects(self, kwargs, message):
    with self.assertRaisesRegex(ValueError, message):
      gba_tf.GBAConfig.preset(kwargs.pop("name"), **kwargs)

  def test_get_config_round_trip(self):
    config = gba_tf.GBAConfig(global_batch_size=96, local_batch_size=32,
                              staleness_threshold=3, decay="inverse",
                              decay_rate=2.0, max_staleness=None)
    self.assertEqual(config_lib.GBAConfig.from_config(config.get_config()),
                     config)
    with self.assertRaisesRegex(ValueError, "unknown GBAConfig keys"):
      config_lib.GBAConfig.from_config({"global_batch": 3})


if __name__ == "__main__":
  tf.test.main()
