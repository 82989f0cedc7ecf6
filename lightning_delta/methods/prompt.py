"""Soft prompt tuning (Lester et al., 2021): ``num_virtual_tokens`` learned embeddings prepended to
the input embeddings, the backbone untouched.

The delta is a child of the model itself (``prompt.embedding``) and rewrites the model's inputs
in a forward pre-hook, as PEFT does: ``input_ids`` become ``inputs_embeds`` with the prompt in
front, ``attention_mask`` gains ``num_virtual_tokens`` ones, ``labels`` of decoder-only models
gain ``-100`` (no loss on the prompt), ``token_type_ids`` gain zeros, and ``position_ids`` are
dropped so the model numbers the longer sequence itself. Works for encoders (BERT), decoders
(GPT-2, Llama) and encoder-decoders (T5: prompt on the encoder side), ``generate()`` included.
Initialised from the embeddings of random vocabulary tokens (``init="vocab"``) or at random.
Parameters: ``num_virtual_tokens * hidden``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_delta.errors import UnsupportedModuleError
from lightning_delta.hf_compat import cache_argument, forward_parameters, pop_cache
from lightning_delta.methods.virtual_tokens import VirtualTokens, VirtualTokensConfig

INITS = ("vocab", "random")


@dataclass
class PromptConfig(VirtualTokensConfig):
    """Soft prompt hyper-parameters.

    Args:
        num_virtual_tokens: length of the soft prompt (> 0).
        init: ``"vocab"`` (embeddings of random vocabulary tokens) or ``"random"`` (normal, the
            embeddings' standard deviation).
    """

    method = "prompt"
    decays = False  # offsets, scales or embeddings: no weight decay
    lr: float = field(default=0.1, kw_only=True)  # benchmarks.quality --sweep
    supported_types = "models with get_input_embeddings() (transformers PreTrainedModel)"

    init: str = "vocab"

    def validate(self) -> None:
        super().validate()
        self.check_range("init", self.init, self.init in INITS, f"one of {list(INITS)}")

    def peft_config(self, deltas: list, **common):
        import peft

        # PEFT's encoder-decoder prompts may be on both sides; ours is on the encoder side
        extra = {"num_transformer_submodules": 1} if common.get("task_type") == "SEQ_2_SEQ_LM" else {}
        return peft.PromptTuningConfig(num_virtual_tokens=self.num_virtual_tokens, **common, **extra)

    peft_type = "PROMPT_TUNING"

    def supports(self, module: nn.Module) -> bool:
        return callable(getattr(module, "get_input_embeddings", None))

    def target_names(self, model: nn.Module) -> list[str]:
        """The model itself, if its inputs are token embeddings (not image patches or audio features)."""
        names = super().target_names(model)
        embeddings = model.get_input_embeddings()
        encoder = model.get_encoder() if getattr(getattr(model, "config", None), "is_encoder_decoder", False) else model
        if not isinstance(embeddings, nn.Embedding) or "inputs_embeds" not in forward_parameters(encoder):
            takes = "" if isinstance(embeddings, nn.Embedding) else \
                f" (its input embeddings are a {type(embeddings).__name__})"
            raise UnsupportedModuleError(
                f"'prompt' puts learned token embeddings in front of the input tokens; {type(model).__name__}"
                f" does not take token embeddings as its input{takes}. Use 'lora', 'ia3', 'adapter' or 'bitfit'"
                " there (prompt tuning works on text models whose forward takes inputs_embeds)")
        return names

    def build(self, module: nn.Module, seed: int, path: str = "") -> SoftPrompt:
        return SoftPrompt(self, module, seed)


class SoftPrompt(VirtualTokens):
    """The learned prompt and the pre-hook that puts it in front of the inputs."""

    def __init__(self, config: PromptConfig, model: nn.Module, seed: int) -> None:
        embeddings = model.get_input_embeddings()
        super().__init__(config, embeddings)
        self.num_virtual_tokens = config.num_virtual_tokens
        self.encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        self.embedding = nn.Parameter(torch.empty(config.num_virtual_tokens, embeddings.weight.shape[1],
                                                  **self.factory))
        self.init, self.init_seed = config.init, seed
        self._signature, self._cache_argument = forward_parameters(model), cache_argument(model)
        self.reset_parameters(embeddings.weight)

    @torch.no_grad()
    def reset_parameters(self, vocabulary: torch.Tensor | None = None) -> None:
        """From the embeddings of random vocabulary tokens, or normal with their standard deviation."""
        if self.embedding.device.type == "meta" or vocabulary is None or vocabulary.device.type == "meta":
            return
        generator = torch.Generator().manual_seed(self.init_seed)
        if self.init == "vocab":
            rows = torch.randint(0, vocabulary.shape[0], (self.num_virtual_tokens,), generator=generator)
            values = vocabulary.detach().float().cpu()[rows]
        else:
            std = float(vocabulary.detach().float().std())
            values = torch.randn(self.embedding.shape, generator=generator) * std
        self.embedding.copy_(values.to(self.embedding.device, self.embedding.dtype))

    def states(self) -> torch.Tensor:
        """The prompt embeddings, ``(num_virtual_tokens, hidden)``."""
        return self.embedding

    def hook_into(self, target: nn.Module) -> None:
        """Decoder-only and encoder models: one pre-hook on the model. Encoder-decoder models: the
        prompt goes in front of the encoder's inputs (also when ``generate()`` runs the encoder by
        itself), and the model's pre-hook extends the mask the decoder's cross-attention reads."""
        target.register_forward_pre_hook(self.pre_hook, with_kwargs=True)
        if self.encoder_decoder:
            target.get_encoder().register_forward_pre_hook(self.encoder_pre_hook, with_kwargs=True)

    def unhook_from(self, target: nn.Module) -> None:
        super().unhook_from(target)
        if self.encoder_decoder:
            super().unhook_from(target.get_encoder())

    def _ones(self, like: torch.Tensor) -> torch.Tensor:
        return torch.ones(like.shape[0], self.num_virtual_tokens, dtype=like.dtype, device=like.device)

    def _extend_mask(self, kwargs: dict, length: int) -> None:
        """Prepends ones to ``attention_mask`` unless it already covers ``length`` positions."""
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2 and mask.shape[1] + self.num_virtual_tokens == length:
            kwargs["attention_mask"] = torch.cat((self._ones(mask), mask), dim=1)

    def _prepend(self, module: nn.Module, kwargs: dict, embedding_owner: nn.Module) -> None:
        """``input_ids`` -> ``inputs_embeds`` with the prompt in front; types, labels, positions follow."""
        ids = kwargs.pop("input_ids", None)
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = embedding_owner.get_input_embeddings()(ids)
        prompt = self.embedding.to(embeds.dtype).expand(embeds.shape[0], -1, -1)
        kwargs["inputs_embeds"] = torch.cat((prompt, embeds), dim=1)
        length = kwargs["inputs_embeds"].shape[1]
        self._extend_mask(kwargs, length)
        labels = kwargs.get("labels")
        if labels is not None and not self.encoder_decoder and labels.dim() == 2:
            kwargs["labels"] = torch.cat((torch.full_like(self._ones(labels), -100), labels), dim=1)
        types = kwargs.get("token_type_ids")
        if types is not None:
            kwargs["token_type_ids"] = torch.cat((torch.zeros_like(self._ones(types)), types), dim=1)
        position = kwargs.get("cache_position")
        if position is not None:
            kwargs["cache_position"] = torch.arange(length, device=position.device)
        kwargs.pop("position_ids", None)

    def pre_hook(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The model's pre-hook (see :meth:`hook_into`)."""
        if not self.active:
            return args, kwargs
        kwargs = {**dict(zip(self._signature, args)), **kwargs}
        if self.encoder_decoder:
            encoded = kwargs.get("encoder_outputs")
            if encoded is not None:
                self._extend_mask(kwargs, encoded[0].shape[1])
            else:
                ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
                source = ids if ids is not None else embeds
                if source is not None:
                    self._extend_mask(kwargs, source.shape[1] + self.num_virtual_tokens)
            return (), kwargs
        cache = pop_cache(kwargs)
        if cache is not None:  # under the name this release's forward takes
            kwargs[self._cache_argument or "past_key_values"] = cache
        past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        if past == 0:
            self._prepend(model, kwargs, model)
        else:  # later generation steps: the prompt is in the cache already
            mask = kwargs.get("attention_mask")
            if mask is not None:
                kwargs["attention_mask"] = torch.cat((self._ones(mask), mask), dim=1)
            if kwargs.get("cache_position") is not None:
                kwargs["cache_position"] = kwargs["cache_position"] + self.num_virtual_tokens
            kwargs.pop("position_ids", None)
        return (), kwargs

    def encoder_pre_hook(self, encoder: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The encoder's pre-hook (encoder-decoder models)."""
        if not self.active:
            return args, kwargs
        kwargs = {**dict(zip(forward_parameters(encoder), args)), **kwargs}
        self._prepend(encoder, kwargs, encoder)
        return (), kwargs

    def forward(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:  # pragma: no cover - hook-only
        raise NotImplementedError("the soft prompt acts through its pre-hook")
