"""What every method must do, driven by one case table (``tests/method_cases.py``): identity at init on
every model family, and gradients that reach the delta's tensors and nothing else."""

import pytest
import torch

from lightning_delta import AdapterConfig, attach
from lightning_delta.methods import METHODS
from method_cases import CASES, ELSEWHERE, IDENTITY, randomize
from models import FAMILIES, family_inputs, family_output, tiny_bert


def test_the_table_covers_every_registered_method():
    assert set(CASES) | set(ELSEWHERE) == set(METHODS) and not set(CASES) & set(ELSEWHERE)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("method", IDENTITY + ["pfeiffer"])
def test_identity_at_init_on_every_family(method, family):
    model = FAMILIES[family]().eval()
    inputs = family_inputs(family)
    reference = family_output(model, inputs)
    config = AdapterConfig(placement="pfeiffer") if method == "pfeiffer" else method
    handle = attach(model, config)  # defaults, preset targets
    assert handle.deltas()
    torch.testing.assert_close(family_output(model, inputs), reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", list(CASES))
def test_gradients_reach_only_delta_parameters(method):
    model = tiny_bert()
    handle = randomize(attach(model, method, **CASES[method].hparams).freeze_backbone())
    model(**family_inputs("bert"), labels=torch.tensor([0, 1])).loss.backward()
    delta = {id(p) for p in handle.delta_parameters()}
    assert delta
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (id(p) in delta), name
        if id(p) in delta:
            assert p.grad.abs().sum() > 0, name
