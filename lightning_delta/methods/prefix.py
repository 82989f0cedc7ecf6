"""Prefix tuning (Li & Liang, 2021): learned keys and values in front of every attention layer.

The delta is a child of the model (``prefix.embedding``, laid out as PEFT's prefix tuning:
``(num_virtual_tokens, num_layers * 2 * kv_heads * head_dim)``). A forward pre-hook builds a
fresh cache holding the prefix for each forward (layers append to the cache they get, so a
cache is never reused across forwards), prepends ``num_virtual_tokens`` ones to the attention
mask and shifts positions by the prefix length, as PEFT does. Works for encoders (BERT),
decoders (GPT-2, Llama) and, as PEFT does with current transformers, the decoder self-attention
of encoder-decoders (T5); ``generate()`` included. Parameters:
``num_virtual_tokens * num_layers * 2 * kv_heads * head_dim``.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_delta.errors import DeltaConfigError, UnsupportedModuleError
from lightning_delta.hf_compat import cache_argument, forward_parameters, pop_cache
from lightning_delta.inits import fill_, kaiming_
from lightning_delta.methods.virtual_tokens import VirtualTokens, VirtualTokensConfig


def cache_owner(model: nn.Module) -> nn.Module:
    """The module whose forward takes a key/value cache (``cache``, or ``past_key_values`` before
    transformers 5.24): the model, or its base model (a BERT classifier's ``bert``), which then gets
    the prefix while the head works as before."""
    if cache_argument(model):
        return model
    base = getattr(model, "base_model", None)
    if isinstance(base, nn.Module) and base is not model and cache_argument(base):
        return base
    raise UnsupportedModuleError(
        f"prefix needs a transformers model whose forward takes a key/value cache (cache or past_key_values);"
        f" {type(model).__name__} and its base model do not. Use 'prompt' or 'lora' there")


#: Inputs that tell the batch size, in the order they are looked up.
_BATCH_SOURCES = ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds")


@functools.cache
def _read_only_cache() -> type:
    """A ``DynamicCache`` whose ``update`` returns prefix + new states without storing the new ones."""
    from transformers import DynamicCache

    class PrefixCache(DynamicCache):
        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
            layer = self.layers[layer_idx]
            return (torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2))

    return PrefixCache


def _attention_shape(config: object) -> tuple[int, int, int]:
    """``(num_layers, kv_heads, head_dim)`` from a transformers config (the decoder's for T5)."""
    layers = (getattr(config, "num_decoder_layers", None) if getattr(config, "is_encoder_decoder", False) else None) \
        or getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or getattr(config, "d_kv", None) or hidden // heads
    return layers, kv_heads, head_dim


@dataclass
class PrefixConfig(VirtualTokensConfig):
    """Prefix tuning hyper-parameters.

    Args:
        num_virtual_tokens: prefix length per layer (> 0).
        projection: reparameterise the prefix as ``MLP(embedding)`` in training (Li & Liang's
            stabiliser); :meth:`Prefix.fold` turns it into plain prefixes for inference.
        projection_dim: hidden width of that MLP.
    """

    method = "prefix"
    decays = False  # offsets, scales or embeddings: no weight decay
    lr: float = field(default=0.03, kw_only=True)  # benchmarks.quality --sweep
    supported_types = "a transformers model (with a config) whose forward takes a key/value cache"

    projection: bool = False
    projection_dim: int = 512

    def validate(self) -> None:
        super().validate()
        d = self.projection_dim
        self.check_range("projection_dim", d, isinstance(d, int) and not isinstance(d, bool) and d > 0,
                         "a positive integer, e.g. projection_dim=512")

    def peft_config(self, deltas: list, **common):
        import peft

        if self.projection:
            raise DeltaConfigError("export the prefix after model.prefix.fold(): PEFT's format holds plain prefixes")
        return peft.PrefixTuningConfig(num_virtual_tokens=self.num_virtual_tokens, **common)

    peft_type = "PREFIX_TUNING"

    def supports(self, module: nn.Module) -> bool:
        return getattr(module, "config", None) is not None

    def target_names(self, model: nn.Module) -> list[str]:
        """The model itself: the prefix enters through its key/value cache."""
        names = super().target_names(model)
        cache_owner(model)  # raises if nothing in it takes past_key_values
        return names

    def build(self, module: nn.Module, seed: int, path: str = "") -> Prefix:
        return Prefix(self, module).seeded(seed)


class Prefix(VirtualTokens):
    """Learned keys and values for every layer, fed to the model as a fresh cache."""

    def __init__(self, config: PrefixConfig, model: nn.Module) -> None:
        super().__init__(config, model.get_input_embeddings())
        self.layers, self.kv_heads, self.head_dim = _attention_shape(model.config)
        self.num_virtual_tokens = config.num_virtual_tokens
        self.encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        width = self.layers * 2 * self.kv_heads * self.head_dim
        if config.projection:
            hidden = model.get_input_embeddings().weight.shape[1]
            self.embedding = nn.Parameter(torch.empty(config.num_virtual_tokens, hidden, **self.factory))
            self.transform = nn.Sequential(nn.Linear(hidden, config.projection_dim, **self.factory), nn.Tanh(),
                                           nn.Linear(config.projection_dim, width, **self.factory))
        else:
            self.embedding = nn.Parameter(torch.empty(config.num_virtual_tokens, width, **self.factory))
            self.transform = None
        owner = cache_owner(model)
        self._signature, self._cache_argument = forward_parameters(owner), cache_argument(owner)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, 1), as PEFT's prefix embedding starts; the projection's layers as ``nn.Linear``."""
        generator = self.generator()
        fill_(self.embedding, lambda t: t.normal_(generator=generator))
        for layer in (self.transform or ()):
            if isinstance(layer, nn.Linear):
                kaiming_(layer.weight, generator)
                bound = 1 / layer.in_features ** 0.5
                fill_(layer.bias, lambda t, b=bound: t.uniform_(-b, b, generator=generator))

    def states(self) -> torch.Tensor:
        """The prefix keys and values, ``(num_virtual_tokens, layers * 2 * kv_heads * head_dim)``."""
        return self.transform(self.embedding) if self.transform is not None else self.embedding

    @torch.no_grad()
    def fold(self) -> None:
        """Replaces the projection by the prefixes it computes now: inference without the MLP,
        the same outputs, and a checkpoint that a plain ``PrefixConfig`` loads."""
        if self.transform is None:
            return
        self.embedding = nn.Parameter(self.states().detach().clone())
        self.transform = None
        self.config = dataclasses.replace(self.config, projection=False)

    def hook_into(self, target: nn.Module) -> None:
        cache_owner(target).register_forward_pre_hook(self.pre_hook, with_kwargs=True)

    def unhook_from(self, target: nn.Module) -> None:
        super().unhook_from(cache_owner(target))

    def cache(self, batch: int, dtype: torch.dtype, store: bool) -> object:
        """A new cache holding the prefix: per layer, keys and values ``(batch, kv_heads, n, head_dim)``.

        With ``store=False`` (training forwards) layers read the prefix but add nothing to it, so a
        block recomputed by activation checkpointing sees exactly what it saw the first time.
        """
        n = self.num_virtual_tokens
        states = self.states().to(dtype).view(n, self.layers * 2, self.kv_heads, self.head_dim)
        states = states.permute(1, 2, 0, 3).unsqueeze(1).expand(-1, batch, -1, -1, -1)  # (2L, B, H, n, D)
        pairs = [(states[2 * i], states[2 * i + 1]) for i in range(self.layers)]
        if self.encoder_decoder:
            # PEFT's layout for encoder-decoders: the stored prefixes are repeated for self- and
            # cross-attention and regrouped four per layer, so decoder layer i's self-attention reads
            # stored pair 2i mod L; cross-attention gets none (PEFT resets that cache). Matched so that
            # PEFT-format exports give the same outputs.
            pairs = [pairs[(2 * i) % self.layers] for i in range(self.layers)]
        from transformers import DynamicCache, EncoderDecoderCache

        cache = DynamicCache(pairs) if store else _read_only_cache()(pairs)
        return EncoderDecoderCache(cache, DynamicCache()) if self.encoder_decoder else cache

    def pre_hook(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Injects a fresh prefix cache (first step), extends the mask and shifts positions past the prefix."""
        if not self.active:
            return args, kwargs
        kwargs = {**dict(zip(self._signature, args)), **kwargs}
        n = self.num_virtual_tokens
        cache = pop_cache(kwargs)
        if cache is None or not cache.get_seq_length():
            batch = next(t.shape[0] for t in (kwargs.get(k) for k in _BATCH_SOURCES) if t is not None)
            dtype = model.get_input_embeddings().weight.dtype
            cache = self.cache(batch, dtype, store=not model.training)
            if kwargs.get("cache_position") is not None:  # counted by the caller without the prefix
                kwargs["cache_position"] = kwargs["cache_position"] + n
        kwargs[self._cache_argument] = cache
        if kwargs.get("position_ids") is not None:  # token positions start after the prefix
            kwargs["position_ids"] = kwargs["position_ids"] + n
        mask_key = "decoder_attention_mask" if self.encoder_decoder else "attention_mask"
        mask = kwargs.get(mask_key)
        if mask is not None and mask.dim() == 2:
            kwargs[mask_key] = torch.cat((mask.new_ones(mask.shape[0], n), mask), dim=1)
        return (), kwargs

    def forward(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:  # pragma: no cover - hook-only
        raise NotImplementedError("the prefix acts through its pre-hook")
