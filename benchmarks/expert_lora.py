"""LoRA on fused expert parameters: a training step's peak memory and time, ours vs PEFT's target_parameters.

``python -m benchmarks.expert_lora``: a random Qwen3-MoE causal LM, 2 layers of 8 experts with
``gate_up_proj`` ``(8, 1024, 256)`` and ``down_proj`` ``(8, 256, 512)``, LoRA r=8 on both, a batch
of 4 x 64 tokens. Peak live tensor bytes above the parameters (:class:`benchmarks.memory.PeakLiveBytes`)
of one forward + backward, against the frozen model's forward (no deltas, no gradients); PEFT folds
``W + s B A`` into a dense expert stack every forward, ours never forms it. Time per step ABBA-ordered.
"""

from __future__ import annotations

import argparse
import copy

import torch

from benchmarks.harness import abba, write
from benchmarks.memory import PeakLiveBytes
from lightning_delta import LoraConfig, attach

TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
MIB = 2**20


def build(experts: int, hidden: int, expert_size: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=1000, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=experts,
                            num_experts_per_tok=2, moe_intermediate_size=expert_size)
    return AutoModelForCausalLM.from_config(config)


def peak_above_parameters(model: torch.nn.Module, step) -> int:
    """Peak live bytes of ``step()`` beyond the tensors alive before it (parameters, buffers, inputs)."""
    existing = [*model.parameters(), *model.buffers()]
    with PeakLiveBytes(existing) as probe:
        step()
    return probe.peak - sum(s.nbytes() for s in {id(t.untyped_storage()): t.untyped_storage()
                                                  for t in existing}.values())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    import peft

    base = build(experts=8, hidden=256, expert_size=512).train()
    ids = torch.randint(0, 1000, (4, 64), generator=torch.Generator().manual_seed(1))
    ours = copy.deepcopy(base)
    attach(ours, LoraConfig(r=8, targets=TARGETS)).freeze_backbone()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, target_modules=[],
                                                                      target_parameters=TARGETS))
    for p in base.parameters():
        p.requires_grad_(False)

    def frozen() -> None:
        with torch.no_grad():
            base(input_ids=ids)

    def step(model):
        def run() -> None:
            model(input_ids=ids, labels=ids).loss.backward()
            model.zero_grad(set_to_none=True)
        return run

    peaks = {"frozen forward": peak_above_parameters(base, frozen),
             "ours (forward + backward)": peak_above_parameters(ours, step(ours)),
             "PEFT (forward + backward)": peak_above_parameters(theirs, step(theirs))}
    timing = abba(step(ours), step(theirs), args.repeats)
    stack = base.model.layers[0].mlp.experts.gate_up_proj
    rows = {name: {"peak_MiB": round(value / MIB, 2), "vs_frozen_forward": round(value / peaks["frozen forward"], 2)}
            for name, value in peaks.items()}
    payload = {
        "model": "Qwen3-MoE, 2 layers, 8 experts: gate_up_proj (8, 1024, 256), down_proj (8, 256, 512); batch 4 x 64",
        "expert_stack_MiB": round(stack.numel() * stack.element_size() / MIB, 2),
        "peak_above_parameters": rows,
        "step_seconds": {"ours": round(timing["a_median"], 4), "peft": round(timing["b_median"], 4),
                         "ours_over_peft": round(timing["ratio"], 3)},
    }
    path = write("expert_lora", payload)
    print("| step | peak above parameters (MiB) | x frozen forward |\n|---|---:|---:|")
    for name, row in rows.items():
        print(f"| {name} | {row['peak_MiB']} | {row['vs_frozen_forward']} |")
    print(f"\nexpert stack (gate_up_proj of one layer): {payload['expert_stack_MiB']} MiB; step time ours"
          f" {timing['a_median']:.3f} s, PEFT {timing['b_median']:.3f} s (ours / PEFT {timing['ratio']:.2f}); {path}")


if __name__ == "__main__":
    main()
