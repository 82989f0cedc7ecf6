"""Overheads and bounds, each measured side by side in one run.

    python -m benchmarks.overheads [--repeats 9]

1. LoRA step time over a "frozen backward" bound: the same model with no delta, gradients flowing
   through every activation, only the embeddings trainable (goal <= 1.05).
2. Full fine-tuning vs LoRA: step time, peak live tensor bytes, checkpoint bytes.
3. Delta checkpoint bytes vs the bytes of delta tensors + optimizer state (goal <= 1.1x + 64 KB),
   and save time as the backbone grows 10x (goal: flat).
4. Attaching LoRA to a 7B Llama config built on the meta device: time and bytes allocated.
5. Inference latency: merged LoRA / unattached backbone (goal <= 1.01), unmerged / backbone.
6. torch.compile: graph breaks in a LoRA forward+loss, ours and PEFT's (torch._dynamo.explain), and
   the compiled train step vs eager, ours and PEFT's.
"""

from __future__ import annotations

import argparse
import copy
import io
import time

import peft
import torch
from torch import nn

from benchmarks.harness import abba, seconds, write
from benchmarks.memory import PeakLiveBytes
from benchmarks.vs_peft import build, peak, stepper
from lightning_delta import DeltaCheckpointHooks, DeltaModel, attach


def frozen_bound(repeats: int) -> dict:
    base, batch = build("minilm")
    lora = copy.deepcopy(base)
    attach(lora, "lora", r=8, targets=["query", "value"]).freeze_backbone()
    bound = copy.deepcopy(base)
    for name, p in bound.named_parameters():
        p.requires_grad_("word_embeddings" in name)  # gradients flow through every activation
    lora_step, _ = stepper(lora, batch)
    bound_step, _ = stepper(bound, batch)
    return abba(lora_step, bound_step, repeats)


def full_vs_lora(repeats: int) -> dict:
    base, batch = build("minilm")
    lora = copy.deepcopy(base)
    attach(lora, "lora", r=8, targets=["query", "value"]).freeze_backbone(trainable="classifier")
    full = copy.deepcopy(base)
    lora_step, lora_opt = stepper(lora, batch)
    full_step, full_opt = stepper(full, batch)
    timing = abba(lora_step, full_step, repeats)
    memory = (peak(lora, lora_step, lora_opt), peak(full, full_step, full_opt))
    sizes = (checkpoint_bytes(lora, lora_opt), checkpoint_bytes(full, full_opt))
    return {**timing, "peak_bytes_lora": memory[0], "peak_bytes_full": memory[1],
            "checkpoint_bytes_lora": sizes[0], "checkpoint_bytes_full": sizes[1]}


class Root(nn.Module):
    """Stands in for a LightningModule holding the backbone as ``model``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


def checkpoint_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of a Lightning-style checkpoint dict: the module's state dict and the optimizer state."""
    root = Root(model)
    if DeltaModel(model).deltas():
        DeltaCheckpointHooks.install(root, "model")
    buffer = io.BytesIO()
    torch.save({"state_dict": root.state_dict(), "optimizer_states": [optimizer.state_dict()]}, buffer)
    return buffer.getbuffer().nbytes


def llama(vocab: int, intermediate: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=intermediate,
                                        num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8))


def checkpoint_scaling(repeats: int) -> list[dict]:
    """The same LoRA (q/v of 4 layers of width 256) on a backbone ~13x larger (vocabulary, MLP width)."""
    rows = []
    for vocab, intermediate in ((8000, 683), (120000, 4096)):
        model = llama(vocab, intermediate)
        attach(model, "lora", r=8).freeze_backbone()
        ids = torch.randint(0, 8000, (2, 32))
        step, optimizer = stepper(model, {"input_ids": ids, "labels": ids})
        step()
        delta_bytes = sum(t.numel() * t.element_size() for t in DeltaModel(model).delta_state_dict().values())
        state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                          if torch.is_tensor(t))
        size = checkpoint_bytes(model, optimizer)
        times = sorted(seconds(lambda: checkpoint_bytes(model, optimizer)) for _ in range(repeats))
        rows.append({"backbone_params": sum(p.numel() for p in model.parameters()), "checkpoint_bytes": size,
                     "delta_plus_optimizer_bytes": delta_bytes + state_bytes,
                     "ratio": size / (delta_bytes + state_bytes), "save_seconds_median": times[len(times) // 2]})
    return rows


def attach_7b() -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                             num_attention_heads=32, num_key_value_heads=32, vocab_size=32000))
    meter = PeakLiveBytes()
    start = time.perf_counter()
    with meter:
        handle = attach(model, "lora", r=8, targets="all-linear").freeze_backbone()
    took = time.perf_counter() - start
    return {"seconds": took, "allocated_bytes": meter.peak, "delta_params": handle.summary().delta,
            "backbone_params": handle.summary().total - handle.summary().delta}


def inference(repeats: int) -> dict:
    base, batch = build("minilm")
    base.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    lora = copy.deepcopy(base)
    handle = attach(lora, "lora", r=8, targets=["query", "value"])
    with torch.no_grad():
        for p in handle.delta_parameters():
            p.normal_(0, 0.02)

    def run(model):
        def forward():
            with torch.no_grad():
                model(**inputs)
        return forward

    unmerged = abba(run(lora), run(base), repeats)
    handle.merge()
    merged = abba(run(lora), run(base), repeats)
    plain = DeltaModel(copy.deepcopy(lora)).merge_and_unload()  # no delta module or hook left
    unloaded = abba(run(plain), run(base), repeats)
    return {"merged_over_backbone": merged["ratio"], "unmerged_over_backbone": unmerged["ratio"],
            "merge_and_unload_over_backbone": unloaded["ratio"], "merged": merged, "unmerged": unmerged,
            "merge_and_unload": unloaded}


def graph_breaks() -> dict:
    base, batch = build("minilm")
    ours = copy.deepcopy(base)
    attach(ours, "lora", r=8, targets=["query", "value"]).freeze_backbone()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, target_modules=["query", "value"]))
    out = {}
    for name, model in (("ours", ours), ("peft", theirs)):
        torch._dynamo.reset()
        explained = torch._dynamo.explain(lambda m=model: m(**batch).loss)()
        out[name] = {"graph_breaks": explained.graph_break_count, "graphs": explained.graph_count,
                     "reasons": sorted({str(b.reason)[:120] for b in explained.break_reasons})[:5]}
    return out


def compiled_vs_eager(repeats: int) -> dict:
    """LoRA train step under torch.compile (inductor) vs eager, ours and PEFT's, on a small BERT shape."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                                    intermediate_size=1024, vocab_size=8000)).train()
    ids = torch.randint(0, 8000, (8, 128), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids[:, 0] % 2}
    ours = copy.deepcopy(base)
    attach(ours, "lora", r=8, targets=["query", "value"]).freeze_backbone()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, target_modules=["query", "value"]))
    out = {}
    for name, model in (("ours", ours), ("peft", theirs)):
        eager, _ = stepper(model, batch)
        compiled, _ = stepper(torch.compile(model), batch)
        start = time.perf_counter()
        compiled()
        out[name] = {"compile_seconds": time.perf_counter() - start, **abba(compiled, eager, repeats)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    results = {"frozen_bound": frozen_bound(args.repeats), "full_vs_lora": full_vs_lora(args.repeats),
               "checkpoint_scaling": checkpoint_scaling(args.repeats), "attach_7b": attach_7b(),
               "inference": inference(args.repeats), "compile": graph_breaks(),
               "compiled_vs_eager": compiled_vs_eager(args.repeats)}
    fb, fl, inf, a7 = results["frozen_bound"], results["full_vs_lora"], results["inference"], results["attach_7b"]
    print(f"LoRA step / frozen-backward bound (MiniLM 16x128): {fb['ratio']:.3f}  (goal <= 1.05)")
    print(f"full fine-tuning vs LoRA (MiniLM): time LoRA/full {fl['ratio']:.3f}, peak memory LoRA/full "
          f"{fl['peak_bytes_lora'] / fl['peak_bytes_full']:.3f}, checkpoint {fl['checkpoint_bytes_lora']:,} B vs "
          f"{fl['checkpoint_bytes_full']:,} B")
    for row in results["checkpoint_scaling"]:
        print(f"checkpoint at {row['backbone_params']:,} backbone params: {row['checkpoint_bytes']:,} B ="
              f" {row['ratio']:.3f} x (delta + optimizer state); save {row['save_seconds_median'] * 1e3:.1f} ms")
    print(f"attach LoRA (all-linear) to a 7B Llama on meta: {a7['seconds']:.3f} s, {a7['allocated_bytes']:,} B "
          f"allocated, {a7['delta_params']:,} delta params  (goal < 1 s, no backbone bytes)")
    print(f"inference merged/backbone {inf['merged_over_backbone']:.3f} (goal <= 1.01), merge_and_unload/backbone "
          f"{inf['merge_and_unload_over_backbone']:.3f}, unmerged/backbone {inf['unmerged_over_backbone']:.3f}")
    print(f"torch.compile graph breaks: ours {results['compile']['ours']['graph_breaks']}, "
          f"PEFT {results['compile']['peft']['graph_breaks']}")
    cve = results["compiled_vs_eager"]
    print(f"compiled/eager LoRA train step (BERT 256x4, 8x128): ours {cve['ours']['ratio']:.3f}, PEFT "
          f"{cve['peft']['ratio']:.3f}; compiled ours/PEFT {cve['ours']['a_median'] / cve['peft']['a_median']:.3f}")
    write("overheads", {"repeats": args.repeats, **results})


if __name__ == "__main__":
    main()
