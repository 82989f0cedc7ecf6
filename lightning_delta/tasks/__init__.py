"""Ready LightningModules for common delta-tuning tasks."""

from lightning_delta.tasks.base import DeltaTask
from lightning_delta.tasks.classification import SequenceClassification
from lightning_delta.tasks.language_modeling import CausalLanguageModeling, Seq2SeqLanguageModeling
from lightning_delta.tasks.backbones import BUNDLED_MINILM, resolve_source

__all__ = [
    "BUNDLED_MINILM",
    "CausalLanguageModeling",
    "DeltaTask",
    "Seq2SeqLanguageModeling",
    "SequenceClassification",
    "resolve_source",
]
