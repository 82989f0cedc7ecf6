"""What soft prompts and prefixes share: a number of virtual tokens, and PEFT's prompt-learning format
(one ``prompt_embeddings`` tensor, ``num_virtual_tokens`` in the adapter config)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightning_delta.core import Delta, WholeModelConfig


@dataclass
class VirtualTokensConfig(WholeModelConfig):
    """Base of :class:`PromptConfig` and :class:`PrefixConfig`.

    Args:
        num_virtual_tokens: how many virtual tokens (> 0).
    """

    num_virtual_tokens: int = 20

    def validate(self) -> None:
        n = self.num_virtual_tokens
        self.check_range("num_virtual_tokens", n, isinstance(n, int) and not isinstance(n, bool) and n > 0,
                         "a positive integer, e.g. num_virtual_tokens=20")

    @classmethod
    def from_peft(cls, settings, parts, name):
        # ours is single (the encoder side for T5); PEFT's may sit on both sides of an encoder-decoder
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
        return {"embedding": shared["prompt_embeddings"]}
