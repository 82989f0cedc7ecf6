"""Trainable embeddings of newly added tokens: only the new rows train, the vocabulary stays frozen.

After ``tokenizer.add_special_tokens(...)`` and ``model.resize_token_embeddings(len(tokenizer))``
the new tokens' rows are untrained. This delta holds a trainable ``(n, hidden)`` copy of those
rows for the input embedding and, where the model has an untied output head, another for the
head: the embedding's output takes the delta's row wherever the input is a new token, and the
head's logits of the new tokens are computed from the delta's rows. Every other row stays frozen
and out of the checkpoint, which holds ``n * hidden`` values per target (one set when the head is
tied to the embedding: the head then reads the embedding delta's rows). ``merge()`` writes the
rows into the weights; ``unmerge()`` puts the old rows back.

The new tokens are the last ``num_new_tokens`` rows (where ``resize_token_embeddings`` puts
them) or the explicit ``token_ids``. Initial values are the rows as they are when the delta is
attached, so attaching changes nothing. To load a checkpoint, add the same tokens and resize
the fresh model the same way first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lightning_delta.core import Delta, DeltaConfig
from lightning_delta.errors import DeltaConfigError, UnsupportedModuleError


def _path_of(model: nn.Module, module: nn.Module | None) -> str | None:
    if module is None:
        return None
    return next((name for name, m in model.named_modules() if m is module), None)


@dataclass
class NewTokensConfig(DeltaConfig):
    """Which rows are new.

    Args:
        num_new_tokens: the last ``num_new_tokens`` rows of the embedding (and head) are new.
        token_ids: or the ids of the new tokens, e.g. ``tokenizer.convert_tokens_to_ids(["<tool>"])``.

    ``targets=None`` attaches to ``model.get_input_embeddings()`` and, if the model has one,
    ``model.get_output_embeddings()``; explicit targets may name any ``nn.Embedding`` / ``nn.Linear``.
    """

    method = "new_tokens"
    decays = False  # offsets, scales or embeddings: no weight decay
    supported_types = "nn.Embedding (input embeddings) and nn.Linear (output heads)"

    num_new_tokens: int | None = None
    token_ids: list[int] = field(default_factory=list)

    def validate(self) -> None:
        n, ids = self.num_new_tokens, self.token_ids
        if (n is None) == (not ids):
            raise DeltaConfigError(
                "new_tokens: give exactly one of num_new_tokens (the last rows, e.g. num_new_tokens=2 after"
                " resize_token_embeddings) or token_ids (e.g. token_ids=[32000, 32001])"
            )
        if n is not None:
            self.check_range("num_new_tokens", n, isinstance(n, int) and not isinstance(n, bool) and n > 0,
                             "a positive integer, e.g. num_new_tokens=2")
        else:
            self.token_ids = list(ids)
            ok = all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids) and \
                len(set(ids)) == len(ids)
            self.check_range("token_ids", ids, ok, "distinct non-negative integers, e.g. token_ids=[32000, 32001]")

    def supports(self, module: nn.Module) -> bool:
        return isinstance(module, (nn.Embedding, nn.Linear))

    def preset(self, model: nn.Module) -> list[str]:
        get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
        embedding = _path_of(model, get_in()) if callable(get_in) else None
        if not embedding:
            raise UnsupportedModuleError(
                f"new_tokens: {type(model).__name__} has no get_input_embeddings(); name the embedding and the"
                " output head: targets=['embed', 'head']"
            )
        head = _path_of(model, get_out()) if callable(get_out) else None
        return [embedding] + ([head] if head else [])

    def rows(self, num_rows: int, path: str) -> list[int]:
        """The new tokens' row indices in a table of ``num_rows`` rows."""
        if self.num_new_tokens is not None:
            if self.num_new_tokens >= num_rows:
                raise DeltaConfigError(
                    f"new_tokens: num_new_tokens={self.num_new_tokens} is not less than the {num_rows} rows of"
                    f" {path!r}; add the tokens and call model.resize_token_embeddings(len(tokenizer)) first"
                )
            return list(range(num_rows - self.num_new_tokens, num_rows))
        outside = [i for i in self.token_ids if i >= num_rows]
        if outside:
            raise DeltaConfigError(
                f"new_tokens: token ids {outside[:5]} are outside the {num_rows} rows of {path!r}; add the tokens"
                " and call model.resize_token_embeddings(len(tokenizer)) first"
            )
        return sorted(self.token_ids)

    def build(self, module: nn.Module, seed: int, path: str = "") -> NewTokens:
        if isinstance(module, nn.Embedding):
            return NewTokenEmbedding(self, module, path)
        return NewTokenHead(self, module, path)

    def tie(self, deltas: list[Delta]) -> None:
        """A head whose weight is the embedding's reads the embedding delta's rows (one set of new rows)."""
        embeddings = {d.weight_id: d for d in deltas if isinstance(d, NewTokenEmbedding)}
        for delta in deltas:
            if isinstance(delta, NewTokenHead) and delta.weight_id in embeddings:
                delta.tie_to(embeddings[delta.weight_id])


class NewTokens(Delta):
    """Shared parts: the new rows' ids (a non-persistent buffer), the rows, merge and unmerge."""

    mergeable = True

    def __init__(self, config: NewTokensConfig, target: nn.Module, path: str, num_rows: int) -> None:
        super().__init__(config, target)
        ids = config.rows(num_rows, path)
        self.register_buffer("token_ids", torch.tensor(ids, dtype=torch.long, device=target.weight.device),
                             persistent=False)
        self.weight_id = id(target.weight)  #: which weight the rows belong to (tied heads share the embedding's)
        self.weight = nn.Parameter(torch.empty(len(ids), target.weight.shape[1], **self.factory))
        self.copy_rows(target)

    @torch.no_grad()
    def copy_rows(self, target: nn.Module) -> None:
        """Initial values: the target's rows as they are now (attaching changes nothing)."""
        if self.weight.device.type != "meta" and target.weight.device.type != "meta":
            self.weight.copy_(target.weight[self.token_ids.to(target.weight.device)].to(self.weight))

    def rows(self) -> torch.Tensor:
        """The trainable new rows, ``(n, hidden)``."""
        return self.weight

    @torch.no_grad()
    def merge(self, target: nn.Module) -> None:
        if not self.merged:
            ids = self.token_ids.to(target.weight.device)
            self.__dict__["_old_rows"] = target.weight[ids].clone()
            target.weight[ids] = self.rows().to(target.weight)
            self.merged = True

    @torch.no_grad()
    def unmerge(self, target: nn.Module) -> None:
        if self.merged:
            target.weight[self.token_ids.to(target.weight.device)] = self.__dict__.pop("_old_rows")
            self.merged = False


class NewTokenEmbedding(NewTokens):
    """On an ``nn.Embedding``: outputs at new-token positions come from the delta's rows."""

    def __init__(self, config: NewTokensConfig, target: nn.Embedding, path: str) -> None:
        super().__init__(config, target, path, target.num_embeddings)
        self.embed_scale = getattr(target, "embed_scale", None)  # scaled embeddings (e.g. Gemma) scale outputs

    def forward(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """x ``(...)`` token ids, output ``(..., hidden)``."""
        ids, x = self.token_ids, x.to(self.token_ids.dtype)
        slot = torch.searchsorted(ids, x).clamp(max=len(ids) - 1)
        hit = ids[slot] == x
        rows = F.embedding(slot, self.rows().to(output.dtype))
        if self.embed_scale is not None:
            rows = rows * torch.as_tensor(self.embed_scale, dtype=output.dtype, device=output.device)
        return torch.where(hit.unsqueeze(-1), rows, output)


class NewTokenHead(NewTokens):
    """On an output head ``nn.Linear``: the new tokens' logits come from the delta's rows."""

    def __init__(self, config: NewTokensConfig, target: nn.Linear, path: str) -> None:
        super().__init__(config, target, path, target.out_features)
        self.bias = None if target.bias is None else nn.Parameter(
            target.bias.detach()[self.token_ids].to(**self.factory).clone())
        self.__dict__["_source"] = None

    def tie_to(self, embedding: NewTokenEmbedding) -> None:
        """Reads ``embedding``'s rows instead of rows of its own (the head's weight is the embedding's)."""
        del self.weight
        self.__dict__["_source"] = embedding

    def rows(self) -> torch.Tensor:
        source = self.__dict__["_source"]
        return self.weight if source is None else source.rows()

    def forward(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """x ``(..., hidden)``, output ``(..., vocab)``: new tokens' logits recomputed from the rows."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        logits = F.linear(x, self.rows().to(x.dtype), bias)
        return output.index_copy(output.dim() - 1, self.token_ids, logits.to(output.dtype))

    @torch.no_grad()
    def merge(self, target: nn.Module) -> None:
        if self.merged:
            return
        if self.__dict__["_source"] is None:  # tied: the embedding delta writes the shared rows
            super().merge(target)
        if self.bias is not None:
            ids = self.token_ids.to(target.bias.device)
            self.__dict__["_old_bias"] = target.bias[ids].clone()
            target.bias[ids] = self.bias.to(target.bias)
        self.merged = True

    @torch.no_grad()
    def unmerge(self, target: nn.Module) -> None:
        if not self.merged:
            return
        if self.__dict__["_source"] is None:
            super().unmerge(target)
        if self.bias is not None:
            target.bias[self.token_ids.to(target.bias.device)] = self.__dict__.pop("_old_bias")
        self.merged = False
