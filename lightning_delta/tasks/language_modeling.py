"""Causal and sequence-to-sequence language modeling with any transformers backbone."""

from __future__ import annotations

import torch
from torchmetrics import MeanMetric
from torchmetrics.text import Perplexity
from typing_extensions import override

from lightning_delta.loss import IGNORE_INDEX, check_chunked_loss, chunked_causal_lm_loss
from lightning_delta.tasks.base import DeltaTask


class _LanguageModeling(DeltaTask):
    """Shared loop: loss in training, loss and perplexity in validation and test."""

    shift_labels = False  #: whether logits at position t predict the label at t + 1 (causal models)

    def __init__(self, model: str, learning_rate: float | None, weight_decay: float, warmup_ratio: float,
                 gradient_checkpointing: bool, lr_by_method: dict[str, float] | None,
                 loraplus_lr_ratio: float | None) -> None:
        super().__init__(model, learning_rate, weight_decay, warmup_ratio, gradient_checkpointing, lr_by_method,
                         loraplus_lr_ratio)
        self.perplexity = torch.nn.ModuleDict({s: Perplexity(ignore_index=IGNORE_INDEX) for s in ("val", "test")})

    def evaluate(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        out = self.model(**batch)
        logits, labels = out.logits, batch["labels"]
        if self.shift_labels:
            logits, labels = logits[:, :-1], labels[:, 1:]
        metric = self.perplexity[stage]
        metric(logits.float(), labels)
        size = len(batch["input_ids"])
        self.log(f"{stage}_loss", out.loss, prog_bar=True, batch_size=size)
        self.log(f"{stage}_ppl", metric, prog_bar=True, batch_size=size)


class CausalLanguageModeling(_LanguageModeling):
    """Next-token prediction with an ``AutoModelForCausalLM`` (GPT-2, Llama, ...); logs loss and perplexity.

    Args:
        model: a hub name or a local folder.
        learning_rate: one peak AdamW learning rate; ``None``: each delta's method's own.
        weight_decay: AdamW weight decay.
        warmup_ratio: fraction of steps with linear warm-up.
        gradient_checkpointing: recompute the backbone's blocks in backward.
        lr_by_method: learning rates per delta method, e.g. ``{"prompt": 3e-2}``.
        loraplus_lr_ratio: LoRA+: ``B`` of LoRA/DoRA learns this many times faster.
        loss_chunk_size: train with :func:`~lightning_delta.loss.chunked_causal_lm_loss` in chunks of this
            many tokens: the same loss without the full-vocabulary logits in memory (Llama, Mistral, Qwen2/3,
            Phi-3, GPT-2, GPT-NeoX). ``None``: the model's own loss.
    """

    shift_labels = True

    def __init__(self, model: str, learning_rate: float | None = None, weight_decay: float = 0.0,
                 warmup_ratio: float = 0.1, gradient_checkpointing: bool = False,
                 lr_by_method: dict[str, float] | None = None, loraplus_lr_ratio: float | None = None,
                 loss_chunk_size: int | None = None) -> None:
        super().__init__(model, learning_rate, weight_decay, warmup_ratio, gradient_checkpointing, lr_by_method,
                         loraplus_lr_ratio)
        self.save_hyperparameters()
        self.model = self.load_backbone("AutoModelForCausalLM")
        if loss_chunk_size is not None:
            check_chunked_loss(self.model, loss_chunk_size)  # before any training

    @override
    def training_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        chunk = self.hparams.loss_chunk_size
        return super().training_loss(batch) if chunk is None else chunked_causal_lm_loss(self.model, batch, chunk)


class Seq2SeqLanguageModeling(_LanguageModeling):
    """Sequence-to-sequence with an ``AutoModelForSeq2SeqLM`` (T5, BART, ...); loss, perplexity, optional exact match.

    Args:
        model: a hub name or a local folder.
        learning_rate: one peak AdamW learning rate; ``None``: each delta's method's own.
        weight_decay: AdamW weight decay.
        warmup_ratio: fraction of steps with linear warm-up.
        generation_metric: also generate (greedy) in validation/test and log ``{stage}_exact_match``,
            the share of examples whose generated tokens equal the target tokens.
        max_new_tokens: generation length limit for that metric.
        gradient_checkpointing: recompute the backbone's blocks in backward.
        lr_by_method: learning rates per delta method, e.g. ``{"prompt": 3e-2}``.
        loraplus_lr_ratio: LoRA+: ``B`` of LoRA/DoRA learns this many times faster.
    """

    def __init__(self, model: str, learning_rate: float | None = None, weight_decay: float = 0.0,
                 warmup_ratio: float = 0.1, generation_metric: bool = False, max_new_tokens: int = 32,
                 gradient_checkpointing: bool = False, lr_by_method: dict[str, float] | None = None,
                 loraplus_lr_ratio: float | None = None) -> None:
        super().__init__(model, learning_rate, weight_decay, warmup_ratio, gradient_checkpointing, lr_by_method,
                         loraplus_lr_ratio)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
        self.save_hyperparameters()
        self.model = self.load_backbone("AutoModelForSeq2SeqLM")
        self.exact_match = torch.nn.ModuleDict({s: MeanMetric() for s in ("val", "test")})

    def _tokens(self, row: torch.Tensor) -> list[int]:
        """Token ids of one sequence without padding, ignored positions, start or end tokens."""
        config = self.model.config
        drop = {IGNORE_INDEX, config.pad_token_id, config.decoder_start_token_id}
        out = []
        for token in row.tolist():
            if token == config.eos_token_id:
                break
            if token not in drop:
                out.append(token)
        return out

    @override
    def evaluate(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        super().evaluate(batch, stage)
        if not self.hparams.generation_metric:
            return
        generated = self.model.generate(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                                        max_new_tokens=self.hparams.max_new_tokens, do_sample=False)
        hits = [float(self._tokens(g) == self._tokens(t)) for g, t in zip(generated, batch["labels"])]
        metric = self.exact_match[stage]
        metric(torch.tensor(hits, device=self.device))
        self.log(f"{stage}_exact_match", metric, batch_size=len(hits))
