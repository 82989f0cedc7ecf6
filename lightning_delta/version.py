"""The package version, in one place (read by setup.cfg, written into checkpoints and model cards)."""

__version__ = "0.1.0"
