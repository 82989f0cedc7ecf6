"""GPU figures, run when CUDA is available (skipped cleanly otherwise): a ~1B-parameter Llama-shaped
model in bf16, tokens/s and peak memory (``torch.cuda.max_memory_allocated``), ours vs PEFT for
LoRA, and full fine-tuning vs LoRA.

    python -m benchmarks.gpu [--repeats 9]
"""

from __future__ import annotations

import argparse
import copy

import torch

from benchmarks.harness import abba, write


def build_1b(device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=18,
                         num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048)
    with torch.device(device):
        return LlamaForCausalLM(config).to(torch.bfloat16).train()


def step_and_peak(model, batch, repeats: int):
    from benchmarks.vs_peft import stepper

    step, _ = stepper(model, batch)

    def synced():
        step()
        torch.cuda.synchronize()

    synced()
    torch.cuda.reset_peak_memory_stats()
    synced()
    return synced, torch.cuda.max_memory_allocated()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("skipped: no CUDA device")
        write("gpu", {"skipped": "no CUDA device"})
        return
    import peft

    from lightning_delta import attach

    device = torch.device("cuda")
    base = build_1b(device)
    ids = torch.randint(0, 32000, (4, 1024), device=device)
    batch = {"input_ids": ids, "labels": ids}
    tokens = ids.numel()
    ours = copy.deepcopy(base)
    attach(ours, "lora", r=16, targets="all-linear").freeze_backbone()  # fp32 deltas on a bf16 backbone
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=16, target_modules="all-linear"))
    ours_step, ours_peak = step_and_peak(ours, batch, args.repeats)
    theirs_step, theirs_peak = step_and_peak(theirs, batch, args.repeats)
    versus = abba(ours_step, theirs_step, args.repeats)
    del theirs, theirs_step
    full_step, full_peak = step_and_peak(base, batch, args.repeats)
    full = abba(ours_step, full_step, max(3, args.repeats // 3))
    rows = {"tokens_per_s_ours": tokens / versus["a_median"], "tokens_per_s_peft": tokens / versus["b_median"],
            "time_ratio": versus["ratio"], "peak_bytes_ours": ours_peak, "peak_bytes_peft": theirs_peak,
            "lora_over_full_time": full["ratio"], "peak_bytes_full": full_peak,
            "device": torch.cuda.get_device_name()}
    print(f"{rows['device']}: LoRA tokens/s ours {rows['tokens_per_s_ours']:.0f}, PEFT {rows['tokens_per_s_peft']:.0f}"
          f" (time ratio {versus['ratio']:.3f}); peak GiB ours {ours_peak / 2**30:.1f}, PEFT {theirs_peak / 2**30:.1f},"
          f" full fine-tuning {full_peak / 2**30:.1f}; LoRA/full time {full['ratio']:.3f}")
    write("gpu", rows)


if __name__ == "__main__":
    main()
