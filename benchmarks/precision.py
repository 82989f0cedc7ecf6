"""Peak live tensor memory of LoRA training steps, fp32 backbone vs bf16 backbone (fp32 deltas).

    python -m benchmarks.precision

Same model, batch and steps on both sides; the bf16 side is what ``precision="bf16-true"`` with
``DeltaCallback`` does (backbone cast to bf16, deltas and their AdamW state fp32, inputs cast).
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from benchmarks.memory import PeakLiveBytes
from lightning_delta import attach, trainable_parameters

RESULTS = Path(__file__).resolve().parent / "results"


def build(dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=512)
    model = LlamaForCausalLM(config)
    attach(model, "lora", r=8).freeze_backbone()
    return model.to(dtype)  # deltas keep fp32


def peak_bytes(dtype: torch.dtype, batch: int = 4, seq: int = 256, steps: int = 3) -> dict:
    model = build(dtype)
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-4)
    ids = torch.randint(0, 32000, (batch, seq), generator=torch.Generator().manual_seed(1))
    meter = PeakLiveBytes([*model.parameters(), *model.buffers()])
    baseline = meter.live
    start = time.perf_counter()
    with meter:
        for _ in range(steps):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return {"dtype": str(dtype).replace("torch.", ""), "batch": batch, "seq": seq, "peak_bytes": meter.peak,
            "param_bytes": baseline, "loss": loss.item(), "seconds": time.perf_counter() - start}


#: (batch, seq): weights dominate the first; activations the second, where transformers keeps
#: RMSNorm, softmax and the loss's logits in fp32 even under a bf16 model.
SHAPES = ((1, 128), (4, 256))


def main() -> None:
    rows, ratios = [], {}
    print(f"{'backbone':<10}{'batch x seq':>12}{'params MiB':>12}{'peak MiB':>10}{'ratio':>8}{'loss':>8}{'s':>6}")
    for batch, seq in SHAPES:
        fp32, bf16 = peak_bytes(torch.float32, batch, seq), peak_bytes(torch.bfloat16, batch, seq)
        ratios[f"{batch}x{seq}"] = bf16["peak_bytes"] / fp32["peak_bytes"]
        for row in (fp32, bf16):
            ratio = row["peak_bytes"] / fp32["peak_bytes"]
            print(f"{row['dtype']:<10}{f'{batch} x {seq}':>12}{row['param_bytes'] / 2**20:>12.1f}"
                  f"{row['peak_bytes'] / 2**20:>10.1f}{ratio:>8.3f}{row['loss']:>8.3f}{row['seconds']:>6.1f}")
        rows += [fp32, bf16]
    print("goal: peak ratio bf16/fp32 <= 0.55")
    RESULTS.mkdir(exist_ok=True)
    out = {"benchmark": "precision",
           "model": "Llama-shaped, 12 layers, hidden 768, vocab 32000 (~110M), LoRA r=8 on q/v",
           "machine": f"{platform.machine()} CPU", "torch": torch.__version__, "rows": rows, "peak_ratio": ratios}
    (RESULTS / "precision.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
