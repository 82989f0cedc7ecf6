"""Combine several deltas on one backbone into a new LoRA delta.

Each source ``i`` contributes its weight update ``dW_i`` (LoRA's ``s_i * B_i @ A_i``, or the dense update of
any method whose effect is one: LoHa, LoKr, VeRA, AdaLoRA; :meth:`Delta.additive_update`) with weight ``w_i``:

* ``cat`` (LoRA sources): ``A = [A_1; A_2; ...]``, ``B = [w_1 s_1 B_1, w_2 s_2 B_2, ...]`` -- exactly
  ``sum_i w_i dW_i`` at rank ``sum_i r_i``.
* ``linear`` (LoRA sources of equal ranks): ``A = sum_i sqrt(|w_i| s_i) A_i``,
  ``B = sum_i sign(w_i) sqrt(|w_i| s_i) B_i``: a sum of the factors, not of the updates -- cheap, exact only
  for a single source; as PEFT's.
* ``svd``: ``sum_i w_i dW_i``, truncated to ``rank`` by SVD.
* ``ties`` (Yadav et al., 2023): keep the ``density`` fraction of largest-magnitude entries of each
  ``dW_i``, elect each entry's sign from the sum of the kept entries, average the weighted entries that
  agree with it, then truncate to ``rank`` by SVD.
* ``dare`` (Yu et al., 2023): drop each entry of each ``dW_i`` with probability ``1 - density`` and
  rescale the rest by ``1 / density``, sum with the weights, truncate to ``rank`` by SVD.

The result has scale 1 (``alpha = r``) and the sources stay attached: detach them or
``set_active`` the new delta.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import torch
from torch import nn

from lightning_delta.core import AttachedDelta, iter_deltas
from lightning_delta.engine import attach_config
from lightning_delta.errors import DeltaConfigError
from lightning_delta.methods.lora import LoRA, LoraConfig

COMBINATIONS = ("cat", "linear", "svd", "ties", "dare")


def _trim(update: torch.Tensor, density: float) -> torch.Tensor:
    """``update`` with all but its ``density`` fraction of largest-magnitude entries zeroed."""
    k = int(density * update.numel())
    if k == 0:
        return torch.zeros_like(update)
    kept = torch.zeros(update.numel(), dtype=torch.bool)
    kept[update.abs().flatten().topk(k).indices] = True
    return update * kept.view_as(update)


def _ties(updates: list[torch.Tensor], weights: Sequence[float], density: float) -> torch.Tensor:
    trimmed = torch.stack([_trim(u, density) for u in updates])
    sign = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0)
    agree = trimmed.sign() == sign
    weighted = trimmed * torch.tensor(weights).view(-1, *[1] * updates[0].dim())
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def _dare(updates: list[torch.Tensor], weights: Sequence[float], density: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    out = torch.zeros_like(updates[0])
    for update, weight in zip(updates, weights):
        keep = torch.rand(update.shape, generator=generator) < density
        out += weight * update * keep / density
    return out


def _factors(update: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``B (out, rank)``, ``A (rank, in)`` with ``B @ A`` the best rank-``rank`` approximation of ``update``."""
    u, s, vh = torch.linalg.svd(update, full_matrices=False)
    rank = min(rank, s.numel())
    return u[:, :rank] * s[:rank], vh[:rank]


def _rank(delta: nn.Module) -> int:
    """A source's rank: LoRA's ``r``; for other methods their ``r`` (AdaLoRA: ``target_r``) at most the
    update's full rank."""
    if isinstance(delta, LoRA):
        return delta.config.r
    shape = delta.additive_update().shape
    r = getattr(delta.config, "r", None) or getattr(delta.config, "target_r", None) or min(shape)
    return min(r, *shape)


def _check(model: nn.Module, names: Sequence[str], weights: Sequence[float], how: str, density: float,
           name: str) -> dict[str, list[AttachedDelta]]:
    if how not in COMBINATIONS:
        raise DeltaConfigError(f"how={how!r} is not one of {list(COMBINATIONS)}")
    if len(names) < 1 or len(weights) != len(names):
        raise DeltaConfigError(f"give one weight per delta: {len(names)} names {list(names)}, {len(weights)} weights")
    if not 0 < density <= 1:
        raise DeltaConfigError(f"density={density!r} must be in (0, 1], e.g. density=0.5")
    attached = {d.name for d in iter_deltas(model)}
    if name in attached:
        raise DeltaConfigError(f"a delta named {name!r} is already attached; pick another name for the combination")
    by_name: dict[str, list[AttachedDelta]] = {}
    for n in names:
        found = list(iter_deltas(model, n))
        if not found:
            raise DeltaConfigError(f"no delta named {n!r}; attached: {sorted(attached)}")
        method = found[0].module.config.method
        if how in ("cat", "linear") and not isinstance(found[0].module, LoRA):
            raise DeltaConfigError(f"{n!r} is {method!r}: how={how!r} joins LoRA factors; use how='svd', 'ties'"
                                   " or 'dare' for other weight updates")
        if found[0].module.weight_offset() is not None:
            raise DeltaConfigError(f"{n!r} trains beside a residual weight (init={found[0].module.config.init!r}):"
                                   " its update is not relative to the backbone, so it does not combine")
        if how in ("cat", "linear") and getattr(found[0].module, "start_factors", lambda: None)() is not None:
            raise DeltaConfigError(f"{n!r} (init={found[0].module.config.init!r}) is relative to its start factors:"
                                   f" how={how!r} would drop them; use how='svd', 'ties' or 'dare'")
        if found[0].module.additive_update() is None:
            raise DeltaConfigError(f"{n!r} is {method!r}, whose effect is not a weight update added to the backbone:"
                                   " only LoRA, LoHa, LoKr, VeRA and AdaLoRA deltas combine")
        if any(d.module.merged for d in found):
            raise DeltaConfigError(f"{n!r} is merged into the weights: unmerge it before combining")
        by_name[n] = found
    first = [d.target_path for d in by_name[names[0]]]
    for n in names[1:]:
        other = [d.target_path for d in by_name[n]]
        if other != first:
            diff = sorted(set(first).symmetric_difference(other))
            raise DeltaConfigError(
                f"{names[0]!r} and {n!r} change different modules (first difference: {diff[:3]}); only deltas on"
                " the same targets combine")
    ranks = {n: _rank(by_name[n][0].module) for n in names}
    if how == "linear" and len(set(ranks.values())) > 1:
        raise DeltaConfigError(f"how='linear' needs equal ranks, got {ranks}; use how='cat' or 'svd'")
    return by_name


def combine_lora(
    model: nn.Module,
    names: Sequence[str],
    weights: Sequence[float] | None = None,
    *,
    name: str,
    how: str = "cat",
    rank: int | None = None,
    density: float = 0.5,
    seed: int = 0,
) -> str:
    """Attaches a new LoRA delta ``name`` that combines the deltas ``names`` of ``model`` (see the module doc).

    Args:
        names: the deltas to combine (LoRA, or for ``svd``/``ties``/``dare`` any weight-update method), all on
            the same targets.
        weights: one weight per delta (default: 1 each).
        how: ``"cat"``, ``"linear"``, ``"svd"``, ``"ties"`` or ``"dare"``.
        rank: rank of the result for ``svd``/``ties``/``dare`` (default: the largest source rank).
        density: fraction of entries kept by ``ties`` and ``dare``.
        seed: seed of ``dare``'s random drops.

    Returns:
        ``name``.

    Raises:
        DeltaConfigError: bad arguments, sources that are no weight update or are merged, or sources on
            different targets.
    """
    weights = [1.0] * len(names) if weights is None else [float(w) for w in weights]
    by_name = _check(model, names, weights, how, density, name)
    sources = [by_name[n] for n in names]
    ranks = [_rank(group[0].module) for group in sources]
    if how == "cat":
        new_rank = sum(ranks)
    elif how == "linear":
        new_rank = ranks[0]
    else:
        new_rank = rank or max(ranks)
    if not isinstance(new_rank, int) or new_rank <= 0:
        raise DeltaConfigError(f"rank={rank!r} must be a positive integer")
    first = sources[0][0].module
    config = LoraConfig(r=new_rank, alpha=float(new_rank), targets=[d.target_path for d in sources[0]],
                        name=name, delta_dtype=first.config.delta_dtype)
    attach_config(model, config)
    with torch.no_grad():
        for position, target in enumerate(d.target_path for d in sources[0]):
            parts = [group[position].module for group in sources]
            new = model.get_submodule(f"{target}.{name}")
            if how == "cat":
                a = torch.cat([p.A.float() for p in parts], dim=0)
                b = torch.cat([w * p.scale * p.B.float() for p, w in zip(parts, weights)], dim=1)
            elif how == "linear":
                roots = [math.sqrt(abs(w) * p.scale) for p, w in zip(parts, weights)]
                a = sum(r * p.A.float() for p, r in zip(parts, roots))
                b = sum(math.copysign(r, w) * p.B.float() for p, r, w in zip(parts, roots, weights))
            else:
                updates = [p.additive_update().float() for p in parts]
                if how == "svd":
                    total = sum(w * u for u, w in zip(updates, weights))
                elif how == "ties":
                    total = _ties(updates, weights, density)
                else:
                    total = _dare(updates, weights, density, seed + zlib.crc32(target.encode()))
                b, a = _factors(total, new_rank)
                b = torch.nn.functional.pad(b, (0, new_rank - b.shape[1]))
                a = torch.nn.functional.pad(a, (0, 0, 0, new_rank - a.shape[0]))
            new.A.copy_(a.reshape(new.A.shape))
            new.B.copy_(b.reshape(new.B.shape))
    return name
