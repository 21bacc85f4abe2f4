"""The job's training and held-out data, and how a model is scored on it."""

import dataclasses
from typing import Optional

import numpy as np

from gba_tf.data import movielens
from gba_tf.data import synthetic
from gba_tf.launch import job_config

# Held-out examples scored per model call in evaluations.
_EVAL_BATCH = 4096


@dataclasses.dataclass(frozen=True)
class JobData:
  train_ids: np.ndarray
  train_labels: np.ndarray
  test_ids: np.ndarray
  test_labels: np.ndarray
  num_fields: int
  vocab_size: int
  best_auc: Optional[float]  # known for synthetic data only


def load_data(config: job_config.JobConfig) -> JobData:
  """The job's train / test data (deterministic by `config.seed`)."""
  if config.dataset == "movielens":
    ml = movielens.load(seed=config.seed)
    data = JobData(ml.train_ids, ml.train_labels, ml.test_ids[
        :config.test_examples], ml.test_labels[:config.test_examples],
                 ml.num_fields, ml.vocab_size, None)
  else:
    gen = synthetic.SyntheticCTR(vocab_per_field=config.vocab_per_field,
                                 seed=config.seed)
    train_ids, train_labels = gen.sample(config.train_examples, seed=1)
    test_ids, test_labels = gen.sample(config.test_examples, seed=3)
    data = JobData(train_ids, train_labels, test_ids, test_labels,
                 gen.num_fields, gen.vocab_size, gen.best_auc())
  for ids, labels in ((data.train_ids, data.train_labels),
                      (data.test_ids, data.test_labels)):
    synthetic.validate_examples(ids, labels, data.num_fields,
                                data.vocab_size)
  return data


def scores(model, ids: np.ndarray) -> np.ndarray:
  """Logits of `model` in batches, outside any replica context."""
  return np.concatenate([
      model(ids[i:i + _EVAL_BATCH], training=False).numpy().ravel()
      for i in range(0, len(ids), _EVAL_BATCH)])


def logloss(labels: np.ndarray, logits: np.ndarray) -> float:
  prob = np.clip(1.0 / (1.0 + np.exp(-logits)), 1e-7, 1 - 1e-7)
  return float(-np.mean(labels * np.log(prob) +
                        (1 - labels) * np.log(1 - prob)))
