"""Ready LightningDataModules."""

from lightning_delta.data.synthetic import SyntheticSentimentData, synthetic_sentiment

__all__ = ["SyntheticSentimentData", "synthetic_sentiment"]
