"""Initialisation from training data: EVA and LoRA-GA for LoRA's factors.

EVA (Paischer et al., 2024) starts each target's ``A`` from the top right-singular vectors of
the target's inputs over a few batches, ``B = 0`` (so the model still computes what the
backbone did). As PEFT's ``initialize_lora_eva_weights``, the singular vectors are those of an
incremental PCA (the inputs centred by their running mean, updated batch by batch), only tokens
the batch's ``attention_mask`` keeps (and whose ``labels`` are not -100) count, and a target stops
updating once its ``r`` components have converged: the cosine similarity of each with its value
one batch before reaches ``tau``. Under ``torch.distributed`` every rank gathers the rows of all
ranks, so all end with the same factors. Ranks stay ``r`` on every target (PEFT's ``rho=1``): no
redistribution by explained variance.

LoRA-GA (Wang et al., 2024) aligns the first step with full fine-tuning: ``G``, the gradient of each
target's weight averaged over the batches (and over ranks), ``G = U S V^T``; ``A = V[:, :r]^T``,
``B = U[:, r:2r] S[r:2r] * out**0.25 / sqrt(16)`` (PEFT's defaults: direction "ArB2r", scale "stable",
gamma 16), and the start ``s B A`` is subtracted so the model begins as the backbone
(:class:`~lightning_delta.methods.lora_modules.LoRAGALinear`). Each singular pair's sign is fixed (the
largest entry of ``V``'s column positive), so every rank and every run agree.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_delta.errors import DeltaConfigError
from lightning_delta.tensors import distributed_like, is_partitioned


class IncrementalPCA:
    """Top-``k`` principal directions of rows seen batch by batch (Ross et al., 2008; sklearn's update)."""

    def __init__(self, k: int) -> None:
        self.k, self.seen = k, 0
        self.mean = self.components = self.singular = None

    def update(self, rows: torch.Tensor) -> None:
        rows = rows.float()
        count, batch_mean = rows.shape[0], rows.mean(0)
        total = self.seen + count
        if self.seen == 0:
            stacked, mean = rows - batch_mean, batch_mean
        else:
            mean = (self.seen * self.mean + count * batch_mean) / total
            shift = math.sqrt(self.seen * count / total) * (self.mean - batch_mean)
            stacked = torch.cat([self.singular[:, None] * self.components, rows - batch_mean, shift[None]])
        _, singular, vh = signed_svd(stacked)  # the signs as sklearn's svd_flip on V
        self.components, self.singular = vh[: self.k], singular[: self.k]
        self.mean, self.seen = mean, total


def _gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's rows, in rank order (ranks may hold different numbers of rows)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows
    sizes = [torch.zeros(1, dtype=torch.long, device=rows.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([rows.shape[0]], device=rows.device))
    largest = int(max(s.item() for s in sizes))
    padded = rows.new_zeros(largest, rows.shape[1])
    padded[: rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[: int(size.item())] for part, size in zip(parts, sizes)])


def token_mask(batch: Any) -> torch.Tensor | None:
    """The tokens a batch's inputs count for EVA: ``attention_mask`` and ``labels != -100`` where present."""
    if not isinstance(batch, Mapping) or not isinstance(batch.get("input_ids"), torch.Tensor):
        return None
    mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
    labels = batch.get("labels")
    if isinstance(labels, torch.Tensor) and labels.shape == mask.shape:
        mask = mask & (labels != -100)
    return mask


class _Inputs:
    """Forward hook: the target's input rows (masked tokens left out) into its incremental PCA."""

    def __init__(self, k: int, tau: float) -> None:
        self.pca, self.tau, self.mask = IncrementalPCA(k), tau, None
        self.converged = False

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        x = args[0].detach()
        if self.mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(self.mask.shape):
            x = x[self.mask.to(x.device)]
        rows = _gather_rows(x.reshape(-1, x.shape[-1]))
        if rows.shape[0] < self.pca.k:  # as PEFT: too few tokens for k components in this batch
            return
        before = self.pca.components
        self.pca.update(rows)
        if before is not None:
            similarity = torch.nn.functional.cosine_similarity(self.pca.components, before)
            self.converged = bool((similarity >= self.tau).all())


@torch.no_grad()
def eva_init(deltas: list[Any], batches: Iterable[Any], forward: Callable[[Any], Any], *, r: int, tau: float,
             limit: int) -> int:
    """Sets each LoRA delta's ``A`` to the top-``r`` principal directions of its target's inputs over at most
    ``limit`` batches (``B`` zero); returns the number of batches run.

    Args:
        deltas: the attached deltas (:class:`~lightning_delta.core.AttachedDelta`) and their targets' modules,
            as ``(attached, target module)`` pairs.
        batches: training batches; ``forward(batch)`` runs one through the model.
    """
    partitioned = [d.target_path for d, _ in deltas if hasattr(d.module.A, "ds_shape")]  # (a DTensor is fine)
    if partitioned:
        raise DeltaConfigError(f"lora init='eva' writes whole factors, and {partitioned[0]!r}'s are partitioned by"
                               " DeepSpeed ZeRO-3: use ZeRO stage 2, DDP or FSDP2 with it")
    hooks = {d.path: _Inputs(r, tau) for d, _ in deltas}
    handles = {d.path: target.register_forward_hook(hooks[d.path]) for d, target in deltas}
    run = 0
    try:
        for batch in batches:
            if run == limit or all(h.converged for h in hooks.values()):
                break
            for path, hook in hooks.items():
                hook.mask = token_mask(batch)
                if hook.converged and path in handles:  # as PEFT: a converged target stops updating
                    handles.pop(path).remove()
            forward(batch)
            run += 1
    finally:
        for handle in handles.values():
            handle.remove()
    missing = [d.target_path for d, _ in deltas if hooks[d.path].pca.components is None]
    if missing:
        raise ValueError(f"EVA saw no input rows for {missing[:3]} in {run} batches: the train dataloader is empty"
                         " or its batches never reach these targets")
    late = [d.target_path for d, _ in deltas if not hooks[d.path].converged]
    if late:
        warnings.warn(f"EVA: {len(late)} of {len(deltas)} targets (e.g. {late[0]!r}) had not converged after {run}"
                      f" batches (cosine similarity below tau={tau}); their A is the estimate so far. Raise"
                      " init_batches for a converged start", stacklevel=2)
    for d, _ in deltas:
        components = hooks[d.path].pca.components
        a = d.module.A
        value = torch.zeros(a.shape, dtype=torch.float32)
        value[: components.shape[0]] = components.cpu()
        a.copy_(distributed_like(value.to(a.dtype), a))
        d.module.B.zero_()
    return run


def signed_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U, S, Vh`` of ``matrix`` with each pair's sign fixed: the largest-magnitude entry of each row of ``Vh``
    positive."""
    u, s, vh = torch.linalg.svd(matrix.float(), full_matrices=False)
    signs = torch.sign(vh.gather(1, vh.abs().argmax(1, keepdim=True)))
    return u * signs.T, s, vh * signs


def _mean_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


@torch.no_grad()
def lora_ga_init(deltas: list[Any], batches: Iterable[Any], forward: Callable[..., Any], *, limit: int,
                 gamma: float = 16.0) -> int:
    """Sets each LoRA-GA delta's ``A``, ``B`` (and their frozen copies ``A0``, ``B0``) from the gradient of its
    target's weight over at most ``limit`` batches; returns the number of batches run.

    Args:
        deltas: ``(attached delta, target module)`` pairs.
        forward: ``forward(batch, grads_of=[weights])`` runs the loss of ``batch`` backward, accumulating
            gradients into those weights only.
    """
    weights = [target.weight for _, target in deltas]
    sharded = [d.target_path for (d, _), w in zip(deltas, weights) if is_partitioned(w)]
    if sharded:
        raise DeltaConfigError(f"lora init='lora_ga' needs the whole gradient of each target's weight, and"
                               f" {sharded[0]!r} is sharded (FSDP2 / ZeRO-3): use init='eva' there, or DDP")
    for w in weights:
        w.grad = None
    run = 0
    for batch in batches:
        if run == limit:
            break
        with torch.enable_grad():
            forward(batch, grads_of=weights)
        run += 1
    if run == 0:
        raise ValueError("LoRA-GA saw no training batch: the train dataloader is empty")
    for (d, _), w in zip(deltas, weights):
        grad = _mean_over_ranks(torch.zeros(w.shape, device=w.device) if w.grad is None else w.grad.float() / run)
        w.grad = None
        if not bool(grad.any()):
            raise ValueError(f"LoRA-GA: no gradient reached {d.target_path!r} in {run} batches (is it on the loss's"
                             " path?); exclude it or use init='default'")
        module, r = d.module, d.module.config.r
        u, s, vh = signed_svd(grad.T if module.transposed else grad)
        a = vh[:r]
        b = u[:, r: 2 * r] * s[r: 2 * r] * (u.shape[0] ** 0.25 / gamma**0.5)
        for tensor, value in ((module.A, a), (module.B, b), (module.A0, a), (module.B0, b)):
            tensor.copy_(value.to(tensor.dtype))
    return run
