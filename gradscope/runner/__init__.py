"""The config-driven run: loading, targets, the engine, checkpointing, parallel; the built-in models."""
