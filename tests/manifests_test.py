"""The Kubeflow manifests parse and carry the roles and counts of the flags."""

import os

from absl.testing import parameterized
import tensorflow as tf
import yaml

_K8S = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), "configs", "k8s")


def _flagfile(path):
  values = {}
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line.startswith("--"):
        name, _, value = line[2:].partition("=")
        values[name] = value
  return values


class ManifestTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("gba", "tfjob_gba.yaml", "gba", {"Chief", "Worker", "PS"}),
      ("sync", "tfjob_sync.yaml", "sync", {"Worker"}),
  )
  def test_manifest_matches_flagfile(self, name, mode, roles):
    flags = _flagfile(os.path.join(_K8S, "job.cfg"))
    with open(os.path.join(_K8S, name)) as f:
      job = yaml.safe_load(f)
    self.assertEqual((job["apiVersion"], job["kind"]),
                     ("kubeflow.org/v1", "TFJob"))
    specs = job["spec"]["tfReplicaSpecs"]
    self.assertEqual(set(specs), roles)
    self.assertEqual(specs["Worker"]["replicas"], int(flags["workers"]))
    if mode == "gba":
      self.assertEqual(specs["PS"]["replicas"], int(flags["ps"]))
      self.assertEqual(specs["Chief"]["replicas"], 1)
    # Sync splits the global batch over the workers: it must divide.
    self.assertEqual(int(flags["global_batch_size"]) % int(flags["workers"]),
                     0)
    for role, spec in specs.items():
      container = spec["template"]["spec"]["containers"][0]
      # The console entry point of the installed wheel (setup.py).
      self.assertEqual(container["command"], ["gba-train"], role)
      self.assertIn(f"--mode={mode}", container["args"], role)
      self.assertIn("--flagfile=/config/job.cfg", container["args"], role)
      mounts = {m["mountPath"] for m in container["volumeMounts"]}
      self.assertIn("/config", mounts, role)
    # --input=shared: the task running the tf.data service (the chief;
    # worker 0 in sync) declares its port.
    if flags.get("input") == "shared":
      host = specs["Chief" if mode == "gba" else "Worker"]
      ports = {p["containerPort"] for p in host["template"]["spec"][
          "containers"][0].get("ports", [])}
      self.assertIn(int(flags["data_service_port"]), ports)
    # Whoever writes checkpoints mounts the model volume.
    writer = specs["Chief" if mode == "gba" else "Worker"]
    self.assertIn("/model", {m["mountPath"] for m in writer["template"][
        "spec"]["containers"][0]["volumeMounts"]})


if __name__ == "__main__":
  tf.test.main()
