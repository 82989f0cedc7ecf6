"""The fused LoRA branch: gradients of the plain expression, the composed path's numbers, less saved."""

from __future__ import annotations

import copy

import pytest
import torch

from benchmarks.memory import saved_for_backward
from lightning_delta import attach
from lightning_delta.core import iter_deltas
from lightning_delta.methods.fused_lora import LoRABranch, lora_branch
from models import tiny_llama


def _inputs(dtype=torch.float64, tokens=(3, 5), dims=(6, 4), rank=2):
    torch.manual_seed(0)
    x = torch.randn(*tokens, dims[0], dtype=dtype, requires_grad=True)
    output = torch.randn(*tokens, dims[1], dtype=dtype, requires_grad=True)
    a = torch.randn(rank, dims[0], dtype=dtype, requires_grad=True)
    b = torch.randn(dims[1], rank, dtype=dtype, requires_grad=True)
    return x, output, a, b


@pytest.mark.parametrize("dropped", [False, True])
def test_gradients_pass_gradcheck(dropped):
    x, output, a, b = _inputs()
    drop = (torch.rand(x.shape) < 0.3) if dropped else None
    assert torch.autograd.gradcheck(lambda *t: LoRABranch.apply(*t, 1.7, drop), (x, output, a, b))


@pytest.mark.parametrize("dropped", [False, True])
def test_values_and_gradients_equal_the_plain_expression(dropped):
    x, output, a, b = _inputs(torch.float32)
    drop = (torch.rand(x.shape) < 0.3) if dropped else None
    plain = output + 1.7 * ((x * ~drop if dropped else x) @ a.T @ b.T)
    fused = LoRABranch.apply(x, output, a, b, 1.7, drop)
    torch.testing.assert_close(fused, plain)
    weights = torch.randn_like(plain)
    expected = torch.autograd.grad((plain * weights).sum(), (x, output, a, b))
    got = torch.autograd.grad((fused * weights).sum(), (x, output, a, b))
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e)


def test_fp32_factors_on_bf16_activations_get_fp32_gradients():
    x, output, a, b = (t.detach() for t in _inputs(torch.float32))
    x, output = x.bfloat16().requires_grad_(), output.bfloat16().requires_grad_()
    a.requires_grad_(), b.requires_grad_()
    fused = LoRABranch.apply(x, output, a, b, 2.0, None)
    assert fused.dtype == torch.bfloat16
    fused.float().square().sum().backward()
    assert (a.grad.dtype, b.grad.dtype, x.grad.dtype) == (torch.float32, torch.float32, torch.bfloat16)
    # the composed path computes in bf16 too (factors cast down): same numbers to bf16 rounding
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    plain = output.detach() + 2.0 * (x.detach() @ a2.bfloat16().T @ b2.bfloat16().T)
    torch.testing.assert_close(fused, plain, rtol=2e-2, atol=1e-2)  # addmm rounds the sum once, not twice
    plain.float().square().sum().backward()
    torch.testing.assert_close(a.grad, a2.grad, rtol=2e-2, atol=1e-2)


def test_dropout_keeps_the_expected_share_and_rescales_only_in_training():
    torch.manual_seed(0)
    x = torch.ones(64, 256)
    a, b = torch.ones(1, 256), torch.ones(1, 1)  # the branch sums each row of dropout(x)
    out = lora_branch(x, torch.zeros(64, 1), a, b, scale=1.0, dropout=0.25, training=True)
    # each entry is (kept count) / 0.75: the mean over 64 x 256 draws is 256 up to sampling noise
    assert out.mean().item() == pytest.approx(256, rel=0.02)
    kept = out * 0.75
    torch.testing.assert_close(kept, kept.round())  # whole numbers of kept entries
    evaluation = lora_branch(x, torch.zeros(64, 1), a, b, scale=1.0, dropout=0.25, training=False)
    torch.testing.assert_close(evaluation, torch.full((64, 1), 256.0))


def _step(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def _fused_and_composed(dtype):
    """All-linear LoRA on Llama (B randomised so the branch matters), and a copy on the composed path."""
    model = tiny_llama().to(dtype)
    attach(model, "lora", r=4, targets="all-linear").freeze_backbone()
    with torch.no_grad():
        for d in iter_deltas(model):
            d.module.B.normal_(0, 0.05)
    composed = copy.deepcopy(model)
    for d in iter_deltas(composed):
        d.module.fused = False
    return model, composed


def test_fp32_model_step_equals_the_composed_path():
    model, composed = _fused_and_composed(torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    (loss, grads), (ref_loss, ref_grads) = _step(model, ids), _step(composed, ids)
    torch.testing.assert_close(loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_bf16_model_step_is_at_least_as_close_to_fp32_as_the_composed_path(device):
    """In bf16 the two round differently (addmm rounds the sum once): judge both against fp32."""
    model, composed = (m.to(device) for m in _fused_and_composed(torch.bfloat16))
    reference = copy.deepcopy(model).float()  # the same bf16 values, computed in fp32
    ids = torch.randint(0, model.config.vocab_size, (2, 12), device=device)
    _, truth = _step(reference, ids)

    def worst_error(grads):
        return max(((grads[n] - truth[n]).norm() / truth[n].norm()).item() for n in truth)

    fused, plain = worst_error(_step(model, ids)[1]), worst_error(_step(composed, ids)[1])
    assert fused <= 1.25 * plain and fused < 0.05, (fused, plain)


def test_autocast_step_is_at_least_as_close_to_fp32_as_the_composed_path(monkeypatch):
    """bf16-mixed: an fp32 model under autocast; the fused branch runs in bf16 like the composed ops."""
    from lightning_delta.methods import lora_modules as lora  # where LoRALinear calls the fused branch

    model, composed = _fused_and_composed(torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    _, truth = _step(copy.deepcopy(model), ids)
    dtypes, fused_branch = [], lora.lora_branch

    def counted(*args):
        out = fused_branch(*args)
        dtypes.append(out.dtype)
        return out

    monkeypatch.setattr(lora, "lora_branch", counted)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, fused = _step(model, ids)
        assert len(dtypes) == len(list(iter_deltas(model))) and set(dtypes) == {torch.bfloat16}
        _, plain = _step(composed, ids)
    assert len(dtypes) == len(list(iter_deltas(model)))  # the composed copy did not go through it

    def worst_error(grads):
        return max(((grads[n] - truth[n]).norm() / truth[n].norm()).item() for n in truth)

    assert worst_error(fused) <= 1.25 * worst_error(plain) and worst_error(fused) < 0.05
    assert all(g.dtype == torch.float32 for g in fused.values())


def _saved(model, ids) -> list[tuple[torch.dtype, int]]:
    return saved_for_backward(lambda: model(input_ids=ids, labels=ids).loss, model.parameters())


def _masks_and_bytes(saved):
    return sum(dtype == torch.bool for dtype, _ in saved), sum(n for _, n in saved)


def test_dropout_saves_only_its_bool_masks_not_dropped_out_copies():
    model = tiny_llama().to(torch.bfloat16)
    attach(model, "lora", r=4, targets="all-linear", dropout=0.1).freeze_backbone()
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    n_targets = len(list(iter_deltas(model)))
    model.eval()  # the same step without dropout
    eval_masks, eval_bytes = _masks_and_bytes(_saved(model, ids))
    model.train()
    train_masks, train_bytes = _masks_and_bytes(_saved(model, ids))
    # one bool mask per target, one byte per input entry, and nothing else
    mask_bytes = sum(ids.numel() * d.module.A.shape[1] for d in iter_deltas(model))
    assert train_masks - eval_masks == n_targets
    assert train_bytes - eval_bytes == mask_bytes
    # the composed path keeps, per target, a dropped-out bf16 copy and the dropout's noise (bf16 on
    # the CPU) instead of the input the targets share (q/k/v, gate/up): more bytes than the fused path
    for d in iter_deltas(model):
        d.module.fused = False
    _, composed_bytes = _masks_and_bytes(_saved(model, ids))
    assert composed_bytes - eval_bytes > 2 * mask_bytes, (composed_bytes - eval_bytes, mask_bytes)
