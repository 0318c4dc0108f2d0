"""The default recipes (``*.yaml``), shipped inside the package: ``hybrid_rl.config.CONFIG_DIR`` is this folder."""
