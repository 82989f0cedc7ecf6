"""Ready LightningModules for common delta-tuning tasks."""

from lightning_delta.tasks.classification import SequenceClassification
from lightning_delta.tasks.sources import BUNDLED_MINILM, resolve_source

__all__ = ["BUNDLED_MINILM", "SequenceClassification", "resolve_source"]
