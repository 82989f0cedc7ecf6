"""The case table of the tests every method must pass: each registered method, the hyper-parameters that
suit the tiny test models, and what to expect of it. A method added to the registry must be added here
(``tests/test_method_table.py`` fails until it is, or until it is listed in ``ELSEWHERE`` with a reason)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Case:
    hparams: dict[str, Any] = field(default_factory=dict)  #: small settings for hidden size 32
    identity: bool = True  #: the model's outputs are unchanged at init (virtual tokens change them)
    mergeable: bool = False


CASES = {
    "lora": Case(mergeable=True),
    "dora": Case(mergeable=True),
    "ia3": Case(mergeable=True),
    "bitfit": Case(mergeable=True),
    "layernorm": Case(mergeable=True),
    "adapter": Case(),
    "parallel_adapter": Case(),
    "low_rank_adapter": Case(),
    "compacter": Case(),
    "vera": Case({"r": 16}),  # VeRA's default rank is 256, OFT's block 32
    "loha": Case({"r": 4, "alpha": 6}),
    "lokr": Case({"r": 2, "alpha": 3}),
    "oft": Case({"block_size": 8}),
    "prompt": Case(identity=False),
    "prefix": Case(identity=False),
}
#: registered methods whose cases live in their own test file, and why
ELSEWHERE = {
    "adalora": "tests/test_adalora.py: its rank allocation needs a training schedule",
    "new_tokens": "tests/test_new_tokens.py: it needs tokens added to the vocabulary",
    "peft": "tests/test_peft_backend.py: the PEFT backend takes a PEFT config, not hyper-parameters",
}
IDENTITY = [m for m, c in CASES.items() if c.identity]
MERGEABLE = [m for m, c in CASES.items() if c.mergeable]


def randomize(handle, seed=0, scale=0.2):
    """Moves every trainable delta tensor away from its initial value (so each gets a gradient)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in handle.delta_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return handle
