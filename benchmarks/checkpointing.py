"""Activation memory and step time of LoRA training with and without activation checkpointing.

    python -m benchmarks.checkpointing

~110M-parameter Llama-shaped model (random weights), batch 1 x 1024 tokens, LoRA r=8 on q/v,
fp32 on the CPU. Peak live tensor bytes come from a dispatch-mode counter; "activation" is the
peak minus the bytes alive before the step (weights, deltas, optimizer state). Step times are
the median of repeated steps after a warm-up, the variants run alternately (ABBA order).
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch

from benchmarks.memory import PeakLiveBytes
from lightning_delta import attach, trainable_parameters
from lightning_delta.recompute import disable_checkpointing, enable_checkpointing

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {"none": None, "every layer": 1, "every 2nd layer": 2}


def build():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=1024)
    model = LlamaForCausalLM(config).train()
    attach(model, "lora", r=8).freeze_backbone()
    return model


def step(model, optimizer, ids) -> None:
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def configure(model, every):
    disable_checkpointing(model)
    if every:
        enable_checkpointing(model, every_n_layers=every)


def main(repeats: int = 3) -> None:
    model = build()
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-4)
    ids = torch.randint(0, 32000, (1, 1024), generator=torch.Generator().manual_seed(1))
    step(model, optimizer, ids)  # warm-up; creates the optimizer state
    rows = {}
    for name, every in VARIANTS.items():
        configure(model, every)
        meter = PeakLiveBytes([*model.parameters(), *model.buffers(),
                               *[t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]])
        before = meter.live
        with meter:
            step(model, optimizer, ids)
        rows[name] = {"every_n_layers": every, "peak_bytes": meter.peak, "activation_bytes": meter.peak - before,
                      "seconds": []}
    order = list(VARIANTS) + list(VARIANTS)[::-1]
    for _ in range(repeats):
        for name in order:
            configure(model, VARIANTS[name])
            start = time.perf_counter()
            step(model, optimizer, ids)
            rows[name]["seconds"].append(time.perf_counter() - start)
    base = rows["none"]
    print(f"{'checkpointing':<18}{'activation MiB':>16}{'ratio':>8}{'step s (median)':>17}{'ratio':>8}"
          f"{'min-max s':>14}")
    for name, row in rows.items():
        row["median_seconds"] = statistics.median(row["seconds"])
        row["activation_ratio"] = row["activation_bytes"] / base["activation_bytes"]
        row["time_ratio"] = row["median_seconds"] / statistics.median(base["seconds"])
        print(f"{name:<18}{row['activation_bytes'] / 2**20:>16.1f}{row['activation_ratio']:>8.3f}"
              f"{row['median_seconds']:>17.2f}{row['time_ratio']:>8.3f}"
              f"{min(row['seconds']):>7.2f}-{max(row['seconds']):.2f}")
    print("goal: every layer checkpointed -> activation ratio <= 0.4, time ratio <= 1.5")
    RESULTS.mkdir(exist_ok=True)
    out = {"benchmark": "checkpointing", "model": "Llama-shaped ~110M, batch 1 x 1024, LoRA r=8 q/v, fp32",
           "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads", "torch": torch.__version__,
           "rows": rows}
    (RESULTS / "checkpointing.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
