"""Causal LM loss without the full-vocabulary logits: the output head and cross-entropy run chunk by
chunk of tokens, each chunk recomputed in the backward instead of kept.

transformers' loss materialises ``(tokens, vocab)`` logits, an fp32 copy, the log-softmax and their
gradient: for a 32k vocabulary that is the largest activation of a delta-tuned model (4 x 1024
tokens: ~0.5 GB per fp32 copy). Here at most one chunk's logits live at a time; the price is the
head's matmul once more per chunk in the backward.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_delta.errors import DeltaConfigError

IGNORE_INDEX = -100

#: model types whose logits are the output head applied to ``base_model``'s last hidden state, with
#: nothing after it (no soft-capping, logit scale or auxiliary loss): tested against their own loss.
PLAIN_HEAD_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox", "phi3"})


def _chunk_loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def check_chunked_loss(model: nn.Module, chunk_size: int) -> None:
    """Raises :class:`DeltaConfigError` unless :func:`chunked_causal_lm_loss` gives ``model``'s own loss."""
    if not (isinstance(chunk_size, int) and not isinstance(chunk_size, bool) and chunk_size > 0):
        raise DeltaConfigError(f"chunk_size={chunk_size!r} must be a positive number of tokens, e.g. 1024")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in PLAIN_HEAD_MODELS:
        raise DeltaConfigError(
            f"the chunked loss computes logits as the output head on the base model's hidden states, which is"
            f" checked for {sorted(PLAIN_HEAD_MODELS)}, not model_type={model_type!r} (it may scale or cap its"
            " logits): set loss_chunk_size=None to use the model's own loss"
        )


def chunked_causal_lm_loss(model: nn.Module, batch: Mapping[str, torch.Tensor], chunk_size: int = 1024) -> torch.Tensor:
    """Next-token cross-entropy of ``model`` on ``batch`` (with ``labels``), as ``model(**batch).loss``.

    Args:
        model: a transformers causal LM whose ``model_type`` is in :data:`PLAIN_HEAD_MODELS`.
        batch: the model's inputs and ``labels`` (``-100`` where ignored), unshifted as transformers takes them.
        chunk_size: tokens per chunk of the head and loss.
    """
    check_chunked_loss(model, chunk_size)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = model.base_model(**inputs).last_hidden_state[:, :-1]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = batch["labels"][:, 1:].reshape(-1).to(hidden.device)
    head = model.get_output_embeddings()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, labels.numel(), chunk_size):
        part = slice(start, start + chunk_size)
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, head, hidden[part], labels[part], use_reentrant=False)
        else:
            total = total + _chunk_loss(head, hidden[part], labels[part])
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)
