"""Command-line entry points (`gba-train`, `gba-launch`, `gba-benchmark`).

Each module runs with `python -m gba_tf.bin.<name>` as well, which is how
the local launcher starts tasks: from an installed wheel there is no
`scripts/` directory to run. `scripts/` keeps thin wrappers for a source
checkout.
"""
