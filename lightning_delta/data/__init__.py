"""Ready LightningDataModules."""

from lightning_delta.data.instruction import InstructionData
from lightning_delta.data.synthetic import SyntheticSentimentData, synthetic_sentiment
from lightning_delta.data.text import TextClassificationData, TextData

__all__ = ["InstructionData", "SyntheticSentimentData", "TextClassificationData", "TextData", "synthetic_sentiment"]
