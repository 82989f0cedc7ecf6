"""Inference from a delta-only checkpoint: rebuild the backbone from its source, load the delta on top.

    python examples/custom_module.py --out sentiment-lora.ckpt
    python examples/inference_from_delta.py --ckpt sentiment-lora.ckpt "What a superb concert." "Dull food."
"""

from __future__ import annotations

import argparse

import torch
from custom_module import SentimentModule

from lightning_delta import DeltaModel, load_delta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--merge", action="store_true", help="fold LoRA into the weights (base-speed inference)")
    parser.add_argument("texts", nargs="+")
    args = parser.parse_args()

    module = SentimentModule()                  # pretrained backbone, fresh classifier
    module = load_delta(module, args.ckpt)      # attaches the recorded LoRA, loads it and the classifier
    if args.merge:
        DeltaModel(module).merge()
    module.eval()
    with torch.no_grad():
        for text, p in zip(args.texts, module(args.texts).tolist()):
            print(f"{p:.3f}\t{'positive' if p > 0.5 else 'negative'}\t{text}")


if __name__ == "__main__":
    main()
