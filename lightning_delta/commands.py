"""``lightning-delta export | merge | inspect``: the commands beside LightningCLI's fit/validate/test/predict.

``export`` and ``merge`` rebuild the backbone a delta checkpoint was trained on -- from ``--model``
when given, else from the task's recorded ``model`` hyper-parameter, else from the ``name_or_path``
in the checkpoint's fingerprint; its transformers class and config come from the record too -- then
load the delta onto it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from lightning_delta.callback import DeltaCallback
from lightning_delta.checkpoint import META_KEY, load_delta, save_delta
from lightning_delta.errors import DeltaConfigError, DeltaStateError
from lightning_delta.files import read_checkpoint
from lightning_delta.handle import DeltaModel, attach
from lightning_delta.hf_compat import load_pretrained
from lightning_delta.lightning_cli import DeltaCLI
from lightning_delta.method_switch import switch_method
from lightning_delta.peft_format import export_peft
from lightning_delta.tasks.backbones import resolve_source
from lightning_delta.tree import model_tree, render_plain, render_rich
from lightning_delta.user_errors import fail, user_errors

COMMANDS = ("export", "merge", "inspect")


def _source_name(ckpt: Mapping[str, Any], model: str | None) -> str:
    if model:
        return resolve_source(model)
    hparams = ckpt.get("hyper_parameters") or {}
    for key in ("model", "source", "pretrained", "model_name_or_path"):
        if isinstance(hparams.get(key), str):
            return resolve_source(hparams[key])
    recorded = ckpt[META_KEY]["fingerprint"].get("source")
    if recorded:
        return recorded
    raise DeltaStateError("the checkpoint does not record where its backbone comes from: pass --model <hub name or"
                          " folder of the pretrained model it was trained on>")


def backbone_for(ckpt: Mapping[str, Any], model: str | None = None) -> tuple[nn.Module, str]:
    """The pretrained backbone a delta checkpoint was trained on, with the config it was trained with.

    Returns:
        The model (eval mode) and the name or folder it was loaded from.

    Raises:
        DeltaStateError: no delta record, or no way to find the backbone.
    """
    import transformers

    meta = ckpt.get(META_KEY)
    if meta is None:
        raise DeltaStateError("the checkpoint has no lightning_delta record: it was not written by DeltaCallback")
    name = _source_name(ckpt, model)
    class_name = meta["fingerprint"].get("class")
    cls = getattr(transformers, class_name, None) if class_name else None
    if cls is None:
        raise DeltaStateError(f"the backbone class {class_name!r} is not a transformers class; rebuild your model"
                              " in Python and use lightning_delta.load_delta(model, ckpt)")
    recorded = meta.get("backbone_config")
    kwargs = {"config": cls.config_class.from_dict(recorded)} if recorded else {}
    # quietly: a head "newly initialized" here comes from the delta checkpoint next
    return load_pretrained(cls, name, **kwargs).eval(), name


def export(ckpt_path: str, to: str, directory: str, model: str | None = None, name: str | None = None) -> Path:
    """Writes a checkpoint's delta as a PEFT adapter (``to="peft"``) or a :func:`save_delta` folder (``"delta"``)."""
    ckpt = read_checkpoint(ckpt_path)
    backbone, _ = backbone_for(ckpt, model)
    load_delta(backbone, ckpt)
    if to == "peft":
        return export_peft(backbone, directory, name=name)
    return save_delta(backbone, directory, names=name)


def merge(ckpt_path: str, out: str, model: str | None = None) -> Path:
    """Folds a checkpoint's deltas into its backbone and writes a stock transformers model (+ tokenizer) to ``out``.

    The folder loads with ``AutoModel*.from_pretrained(out)`` without lightning_delta.

    Raises:
        MergeError: a delta cannot be merged (adapters, prompts, prefixes): export it instead.
    """
    if Path(out).exists() and not Path(out).is_dir():
        raise DeltaConfigError(f"--out {out!r} is an existing file; merge writes a folder (save_pretrained layout):"
                               " name a new folder, or an existing one to overwrite its model files")
    ckpt = read_checkpoint(ckpt_path)
    backbone, name = backbone_for(ckpt, model)
    merged = DeltaModel(load_delta(backbone, ckpt)).merge_and_unload()
    merged.save_pretrained(out)
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(name).save_pretrained(out)
    except (OSError, ValueError) as err:
        print(f"lightning-delta merge: no tokenizer saved ({name!r} has none readable: {err})", file=sys.stderr)
    return Path(out)


def _inspect_model(args: argparse.Namespace) -> nn.Module:
    if args.config:
        argv, sys.argv = sys.argv, sys.argv[:1]  # arguments come from args alone: no "args and argv" warning
        try:
            cli = DeltaCLI(args=["--config", args.config, *switch_method(args.overrides)], run=False)
        finally:
            sys.argv = argv
        (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, DeltaCallback)]
        if not callback.has_backbone(cli.model):
            cli.model.configure_model()
        callback.attach(cli.model)
        return cli.model
    import transformers

    cls = getattr(transformers, args.auto_class)
    model = load_pretrained(cls, resolve_source(args.model))
    attach(model, args.method, targets=args.targets or None).freeze_backbone(args.trainable)
    return model


def inspect(args: argparse.Namespace) -> None:
    """Prints the model tree (rich in a terminal, plain text when piped, JSON with ``--json``)."""
    model = _inspect_model(args)
    tree = model_tree(model)
    summary = DeltaModel(model).summary()
    if args.json:
        counts = {"total": summary.total, "trainable": summary.trainable, "delta": summary.delta,
                  "per_delta": summary.per_delta, "adam_state_bytes": summary.adam_state_bytes}
        print(json.dumps({"tree": tree.to_dict(), "summary": counts}, indent=2))
    elif sys.stdout.isatty() and not args.plain:
        from rich.console import Console

        console = Console()
        console.print(render_rich(tree, args.depth))
        console.print(str(summary), markup=False)
    else:
        print(render_plain(tree, args.depth))
        print(summary)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="lightning-delta", description="export, merge and inspect delta checkpoints"
                                  " (fit/validate/test/predict: lightning-delta fit --help)")
    sub = top.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="write a checkpoint's delta as a PEFT adapter or a delta folder")
    exp.add_argument("--ckpt", required=True, help="a delta checkpoint (.ckpt) written by DeltaCallback")
    exp.add_argument("--to", required=True, choices=["peft", "delta"], help="peft: PEFT's adapter format;"
                     " delta: delta.safetensors + delta.json")
    exp.add_argument("directory", help="output folder")
    exp.add_argument("--model", help="the pretrained backbone (hub name or folder); default: the recorded one")
    exp.add_argument("--name", help="which delta, when the checkpoint holds several")
    mrg = sub.add_parser("merge", help="fold the deltas into the backbone and save a plain transformers model")
    mrg.add_argument("--ckpt", required=True, help="a delta checkpoint (.ckpt) written by DeltaCallback")
    mrg.add_argument("--out", required=True, help="output folder (save_pretrained layout, with the tokenizer)")
    mrg.add_argument("--model", help="the pretrained backbone (hub name or folder); default: the recorded one")
    ins = sub.add_parser("inspect", help="the model tree with deltas and trainable parameters marked")
    what = ins.add_mutually_exclusive_group(required=True)
    what.add_argument("--config", help="a lightning-delta YAML config: its model with its delta section attached")
    what.add_argument("--model", help="a hub name or folder (with --method)")
    ins.add_argument("--method", default="lora", help="with --model: the delta method (default: lora)")
    ins.add_argument("--targets", nargs="*", help="with --model: target patterns (default: the method's preset)")
    ins.add_argument("--trainable", nargs="*", default=[], help="with --model: modules trained whole")
    ins.add_argument("--auto-class", default="AutoModel", help="with --model: the transformers class to load with"
                     " (default: AutoModel; e.g. AutoModelForSequenceClassification)")
    ins.add_argument("--depth", type=int, help="show this many levels")
    ins.add_argument("--json", action="store_true", help="print the tree and counts as JSON")
    ins.add_argument("--plain", action="store_true", help="plain text even in a terminal")
    ins.add_argument("overrides", nargs="*", help="with --config: extra LightningCLI arguments, e.g."
                     " --delta.method.init_args.r=4 (after --)")
    return top


def run(argv: list[str], debug: bool = False) -> int:
    """Runs one of ``export``, ``merge``, ``inspect``; a user's mistake prints one short block and exits 2."""
    args = parser().parse_args(argv)
    try:
        if args.command == "export":
            out = export(args.ckpt, args.to, args.directory, args.model, args.name)
            print(f"wrote {out}")
        elif args.command == "merge":
            print(f"wrote {merge(args.ckpt, args.out, args.model)}")
        else:
            inspect(args)
    except user_errors() as err:
        if debug:
            raise
        fail(args.command, err)
    return 0
