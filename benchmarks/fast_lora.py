"""The fused LoRA branch against the composed one and against PEFT: a bf16 Llama-shaped model with
LoRA on every linear layer (r=16, dropout 0.05), one training step (forward, backward, AdamW).

    python -m benchmarks.fast_lora [--repeats 9] [--dropout 0.05]

On a CUDA device: the ~1B Llama of ``benchmarks.gpu`` (batch 4 x 1024), tokens/s and
``torch.cuda.max_memory_allocated``. Without one: a 4-layer, 512-wide Llama (batch 4 x 256) with
peak live tensor bytes from the dispatch-mode counter. Every row also counts the aten ops one step
dispatches (kernel launches, on a GPU) and the bytes autograd saves for the backward; the last row
also trains with the chunked causal LM loss (``lightning_delta.loss``, chunks of 256 tokens).
Times are ABBA-ordered pairs against PEFT, in one process.
"""

from __future__ import annotations

import argparse
import copy

import peft
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.harness import abba, write
from benchmarks.memory import PeakLiveBytes, saved_for_backward
from benchmarks.vs_peft import stepper
from lightning_delta import attach
from lightning_delta.core import iter_deltas
from lightning_delta.loss import chunked_causal_lm_loss


class OpCount(TorchDispatchMode):
    """Counts the aten ops dispatched while on."""

    count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def build(device: torch.device):
    """The bf16 backbone and one batch: ~1B on CUDA, a small Llama on the CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if device.type == "cuda":
        from benchmarks.gpu import build_1b

        model, shape = build_1b(device), (4, 1024)
    else:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376,
                                             num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8))
        model, shape = model.to(torch.bfloat16).train(), (4, 256)
    ids = torch.randint(0, model.config.vocab_size, shape, generator=torch.Generator().manual_seed(1)).to(device)
    return model, {"input_ids": ids, "labels": ids}


def variants(base, dropout: float) -> dict:
    fused = copy.deepcopy(base)
    attach(fused, "lora", r=16, alpha=32, dropout=dropout, targets="all-linear").freeze_backbone()
    composed = copy.deepcopy(fused)
    for d in iter_deltas(composed):
        d.module.fused = False
    peft_config = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules="all-linear")
    return {"fused": fused, "composed": composed, "peft": peft.get_peft_model(copy.deepcopy(base), peft_config),
            "fused+chunked": fused}


#: the loss each variant trains with (default: the model's own)
LOSSES = {"fused+chunked": lambda model, batch: chunked_causal_lm_loss(model, batch, chunk_size=256)}


def saved_bytes(model, batch, loss=None) -> int:
    """Bytes of the storages autograd keeps for one backward, parameters excluded."""
    saved = saved_for_backward(lambda: model(**batch).loss if loss is None else loss(model, batch),
                               model.parameters())
    model.zero_grad(set_to_none=True)
    return sum(n for _, n in saved)


def measure(model, batch, device: torch.device, loss=None) -> dict:
    step, optimizer = stepper(model, batch, loss)
    step()  # optimizer state from here on
    counter = OpCount()
    with counter:
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        meter = PeakLiveBytes([*model.parameters(), *model.buffers(),
                               *[t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]])
        with meter:
            step()
        peak = meter.peak
    synced = (lambda: (step(), torch.cuda.synchronize())) if device.type == "cuda" else step
    return {"step": synced, "peak_bytes": peak, "ops_per_step": counter.count,
            "saved_bytes": saved_bytes(model, batch, loss)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--dropout", type=float, default=0.05)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base, batch = build(device)
    tokens = batch["input_ids"].numel()
    runs = {name: measure(model, batch, device, LOSSES.get(name))
            for name, model in variants(base, args.dropout).items()}
    rows = {"peft": {"time_over_peft": 1.0}}
    for name in ("fused", "composed", "fused+chunked"):
        timing = abba(runs[name]["step"], runs["peft"]["step"], args.repeats)
        rows[name] = {"tokens_per_s": tokens / timing["a_median"], "time_over_peft": timing["ratio"]}
        rows["peft"].setdefault("tokens_per_s", tokens / timing["b_median"])
    for name, run in runs.items():
        rows[name].update({k: run[k] for k in ("peak_bytes", "ops_per_step", "saved_bytes")})
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{where}, bf16 Llama {sum(p.numel() for p in base.parameters()) / 1e6:.0f}M, batch"
          f" {tuple(batch['input_ids'].shape)}, LoRA all-linear r=16 dropout {args.dropout}")
    print(f"{'':<14}{'tokens/s':>10}{'PEFT/this time':>16}{'peak MiB':>10}{'saved MiB':>11}{'ops/step':>10}")
    for name, r in rows.items():
        print(f"{name:<14}{r['tokens_per_s']:>10.0f}{1 / r['time_over_peft']:>16.3f}{r['peak_bytes'] / 2**20:>10.1f}"
              f"{r['saved_bytes'] / 2**20:>11.1f}{r['ops_per_step']:>10}")
    print("goal (GPU): fused >= 1.3x PEFT's tokens/s at equal or lower peak memory")
    write("fast_lora" if device.type == "cpu" else "fast_lora_gpu",
          {"device": where, "dropout": args.dropout, "repeats": args.repeats, "rows": rows})


if __name__ == "__main__":
    main()
