"""The LoRA branch of a linear target as one autograd function: fewer kernels and saved activations.

``output + s * dropout(x) @ A.T @ B.T`` written as autograd would run it costs, per target, a
dropout that materialises ``dropout(x)`` (saved for ``A``'s gradient beside its mask), a full-size
``update`` tensor that an ``add`` then reads back, and a ``mul`` for the scale. Here:

* the dropout mask is drawn as ``bool`` and only the mask is saved (``x`` is kept anyway, so the
  dropped-out copy, a full activation per target, never outlives the forward; the backward
  recomputes it, one ``masked_fill``);
* the scale ``s / (1 - p)`` rides on the GEMM (``addmm``'s ``alpha``) and the update is added in
  the same ``addmm`` as it is computed, so no ``(tokens, out)`` update tensor is written and read;
* the backward writes the five products it needs and nothing else.

Gradients are those of the plain expression (``gradcheck`` in float64, ``tests/test_fused_lora.py``).
"""

from __future__ import annotations

import torch


class LoRABranch(torch.autograd.Function):
    """``output + scale * x.masked_fill(drop, 0) @ a.T @ b.T``; ``drop`` a ``bool`` mask of x's shape, or ``None``.

    ``a`` ``(r, in)`` and ``b`` ``(out, r)`` may be stored in another dtype than the activations
    (fp32 factors on a bf16 backbone): they are cast to ``x``'s dtype, and their gradients come back
    in their own dtype.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, output: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
                drop: torch.Tensor | None) -> torch.Tensor:
        a_, b_ = a.to(x.dtype), b.to(x.dtype)
        x2 = x.reshape(-1, x.shape[-1])
        dropped = x2 if drop is None else x2.masked_fill(drop.reshape(x2.shape), 0)
        hidden = dropped @ a_.T  # (tokens, r)
        result = torch.addmm(output.reshape(-1, output.shape[-1]), hidden, b_.T, alpha=scale)
        ctx.save_for_backward(x, drop, a_, b_, hidden)
        ctx.scale, ctx.dtypes = scale, (a.dtype, b.dtype)
        return result.view(output.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, drop, a_, b_, hidden = ctx.saved_tensors
        need_x, need_output, need_a, need_b = ctx.needs_input_grad[:4]
        grad2 = grad.reshape(-1, grad.shape[-1]).to(x.dtype)
        grad_x = grad_a = grad_b = None
        if need_b:
            grad_b = torch.mm(grad2.T, hidden).mul_(ctx.scale).to(ctx.dtypes[1])
        if need_x or need_a:
            grad_hidden = torch.mm(grad2, b_).mul_(ctx.scale)  # (tokens, r)
            if need_a:
                x2 = x.reshape(-1, x.shape[-1])
                dropped = x2 if drop is None else x2.masked_fill(drop.reshape(x2.shape), 0)
                grad_a = torch.mm(grad_hidden.T, dropped).to(ctx.dtypes[0])
            if need_x:
                grad_x = torch.mm(grad_hidden, a_)
                if drop is not None:
                    grad_x.masked_fill_(drop.reshape(grad_x.shape), 0)
                grad_x = grad_x.view(x.shape)
        return grad_x, grad if need_output else None, grad_a, grad_b, None, None


def lora_branch(x: torch.Tensor, output: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
                dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """``output + scale * dropout(x) @ a.T @ b.T`` through :class:`LoRABranch` (dropout only in training).

    Under autocast (``bf16-mixed``, ``16-mixed``) the branch runs in the autocast dtype, as the
    composed ops would: ``x`` is cast once, the factors inside.
    """
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            return lora_branch(x.to(dtype), output.to(dtype), a, b, scale, dropout, training)
    drop = None
    if training and dropout > 0:
        if x.device.type == "cpu":  # one uniform draw and a compare beat the CPU's bool bernoulli by ~1.6x
            drop = torch.rand(x.shape) < dropout
        else:
            drop = torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(dropout)
        scale = scale / (1 - dropout)
    return LoRABranch.apply(x, output, a, b, scale, drop)
