"""gba_tf: Global Batch gradients Aggregation for TensorFlow."""

import setuptools

setuptools.setup(
    name="gba_tf",
    version="0.1.0",
    description=("Switch recommendation models between synchronous and "
                 "asynchronous distributed training without re-tuning "
                 "(GBA, arXiv 2205.11048)."),
    packages=setuptools.find_packages(include=["gba_tf", "gba_tf.*"]),
    # Compiled on first use by gba_tf/launch/loopback.py.
    package_data={"gba_tf.launch": ["loopback.c"]},
    python_requires=">=3.10",
    install_requires=[
        # tensorflow-recommenders depends on the full `tensorflow` wheel, so
        # tensorflow-cpu would be installed twice; pin the full one.
        "tensorflow==2.21.*",
        "tf-keras==2.21.*",
        "tensorflow-recommenders==0.7.7",
        "numpy",
        "absl-py",
        # tf.summary's implementation (GBAMetrics writes TensorBoard
        # summaries); TF 2.21 no longer installs it.
        "tensorboard",
        # The benchmark's PNG plots (AUC curves, throughput bars).
        "matplotlib",
    ],
    # `gba-launch` starts every task as `python -m gba_tf.bin.train`, so an
    # installed wheel runs a local job from any directory.
    entry_points={
        "console_scripts": [
            "gba-train=gba_tf.bin.train:main",
            "gba-launch=gba_tf.bin.launch_local:run",
            "gba-benchmark=gba_tf.bin.benchmark:run",
            "gba-simulate=gba_tf.bin.simulate:run",
            "gba-compare=gba_tf.bin.compare:run",
        ],
    },
    extras_require={
        # pyyaml: the Kubeflow manifest tests parse YAML.
        "test": ["pytest>=8", "pytest-timeout>=2.3", "pyyaml>=6"],
    },
)
