"""What soft prompts and prefixes share: a number of virtual tokens, and PEFT's prompt-learning format
(one ``prompt_embeddings`` tensor, ``num_virtual_tokens`` in the adapter config)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lightning_delta.core import Delta, WholeModelConfig
from lightning_delta.errors import DeltaStateError


@dataclass
class VirtualTokensConfig(WholeModelConfig):
    """Base of :class:`PromptConfig` and :class:`PrefixConfig`.

    Args:
        num_virtual_tokens: how many virtual tokens (> 0).
    """

    packs = False  # virtual tokens in front of each row: packed examples would mix
    num_virtual_tokens: int = 20

    def validate(self) -> None:
        n = self.num_virtual_tokens
        self.check_range("num_virtual_tokens", n, isinstance(n, int) and not isinstance(n, bool) and n > 0,
                         "a positive integer, e.g. num_virtual_tokens=20")

    #: a prompt-learning adapter holds its modules_to_save (a classifier head) at ``base_model.<path>``
    peft_module_prefix: ClassVar[str] = "base_model."

    @classmethod
    def from_peft(cls, settings, parts, name):
        # PEFT gives encoder-decoders num_transformer_submodules=2 by default; its prompt-learning forward
        # and generate() read only the first num_virtual_tokens rows (the prefix repeats them for the
        # cross-attention, which ours does too), so those rows are the whole adapter: see load_peft_state
        submodules = settings.get("num_transformer_submodules") or 1
        if submodules not in (1, 2):
            cls.refuse_peft_options(settings, {"num_transformer_submodules": 1})
        return cls(num_virtual_tokens=int(settings["num_virtual_tokens"]), **({"name": name} if name else {}))


class VirtualTokens(Delta):
    """Base of the soft prompt and prefix deltas: ``states()`` is what PEFT stores as ``prompt_embeddings``."""

    def states(self) -> torch.Tensor:
        """The virtual tokens' values as PEFT's format holds them (``num_virtual_tokens`` rows)."""
        raise NotImplementedError(f"{type(self).__name__} must implement states()")

    def peft_state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.states().detach()}

    def load_peft_state(self, parts, shared):
        """PEFT's ``prompt_embeddings``: ``num_virtual_tokens`` rows, or twice that for an encoder-decoder
        (``num_transformer_submodules=2``), of which PEFT's forward uses the first ``num_virtual_tokens``."""
        stored = shared.get("prompt_embeddings")
        n, width = self.embedding.shape
        if stored is None or stored.dim() != 2 or stored.shape[1] != width or stored.shape[0] not in (n, 2 * n):
            shape = None if stored is None else tuple(stored.shape)
            raise DeltaStateError(f"PEFT's prompt_embeddings has shape {shape}; this {self.config.method} needs"
                                  f" ({n}, {width}) (or ({2 * n}, {width}) from an encoder-decoder)")
        return {"embedding": stored[:n]}
