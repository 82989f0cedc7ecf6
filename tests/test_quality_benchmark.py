"""benchmarks.quality: its goal checks and summaries, and one tiny run of the command end to end."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.quality import best_rates, goals, summarize

ROOT = Path(__file__).resolve().parents[1]


def result(row, acc, seed=0, trainable=10):
    return {"row": row, "lr": None, "seed": seed, "acc": acc, "f1": acc, "trainable": trainable, "step_s": 0.1,
            "checkpoint_bytes": 2048}


def test_summaries_average_over_seeds_and_keep_failures():
    table = {t["row"]: t for t in summarize([result("lora", 0.8), result("lora", 0.9, seed=1),
                                             {"row": "prefix", "lr": None, "seed": 0, "error": "ValueError: no"}])}
    assert round(table["lora"]["acc"], 6) == 85.0 and round(table["lora"]["acc_sd"], 4) == 7.0711
    assert table["lora"]["seeds"] == 2 and table["lora"]["checkpoint_kb"] == 2.0
    assert table["prefix"] == {"row": "prefix", "error": "ValueError: no"}


def test_a_multi_seed_sweep_picks_the_best_mean_minus_spread():
    runs = [{**result("prompt", acc, seed), "lr": lr} for lr, accs in ((0.03, (0.50, 0.85, 0.32)),
                                                                        (0.1, (0.86, 0.53, 0.52)))
            for seed, acc in enumerate(accs)]
    runs += [{**result("prompt", 0.95), "lr": 0.3}]  # one seed only: not compared with the three-seed rates
    runs += [{**result("lora", acc), "lr": lr} for lr, acc in ((0.003, 0.87), (0.005, 0.90))]
    assert best_rates(runs) == {"prompt": 0.1, "lora": 0.005}


def test_goals_are_marked_from_the_table():
    table = summarize([result("full", 0.90), result("lora", 0.895), result("head", 0.50), result("prompt", 0.65),
                       result("peft:lora", 0.91), result("lora+bitfit", 0.89)])
    lines = goals(table)
    assert "- met: LoRA within 1 point of full fine-tuning (89.5 vs 90.0)" in lines
    assert "- NOT met: prompt at least 20 points above the head alone (65.0 vs 50.0)" in lines
    assert "- NOT met: lora at most 0.5 points below PEFT's (89.5 vs 91.0)" in lines
    assert "- NOT met: lora+bitfit not below lora (89.0 vs 89.5)" in lines
    assert "- met: lora at least 20 points above the head alone (89.5 vs 50.0)" in lines


def test_the_command_runs_rows_and_writes_the_table_and_plot(tmp_path):
    """Two rows, two seeds, six steps on a small three-class file: JSON, markdown and SVG with both rows."""
    for split, count in (("train", 48), ("test", 24)):
        with open(tmp_path / f"{split}.tsv", "w", newline="") as f:
            writer = csv.writer(f, dialect="excel-tab")
            writer.writerow(["label", "text"])
            for i in range(count):
                label = ("LOC", "HUM", "NUM")[i % 3]
                writer.writerow([label, {"LOC": "Where is the city", "HUM": "Who wrote the book",
                                         "NUM": "How many days are in the year"}[label] + f" number {i} ?"])
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.quality", "--setting", "smoke", "--rows", "lora", "head", "--seeds", "2",
         "--jobs", "1", "--train", str(tmp_path / "train.tsv"), "--test", str(tmp_path / "test.tsv"),
         "--out", str(out)], capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "quality_smoke.json").read_text())
    assert {t["row"] for t in report["table"]} == {"lora", "head"}
    lora = next(t for t in report["table"] if t["row"] == "lora")
    assert lora["seeds"] == 2 and 0 <= lora["acc"] <= 100 and lora["trainable"] > 0
    assert "| lora |" in (out / "quality_smoke.md").read_text()
    assert (out / "quality_smoke.svg").read_text().count("<circle") == 2
    again = subprocess.run(  # --rows re-runs one row and keeps the table's others
        [sys.executable, "-m", "benchmarks.quality", "--setting", "smoke", "--rows", "head", "--seeds", "2",
         "--jobs", "1", "--train", str(tmp_path / "train.tsv"), "--test", str(tmp_path / "test.tsv"),
         "--out", str(out)], capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    merged = json.loads((out / "quality_smoke.json").read_text())
    assert [t["row"] for t in merged["table"]] == ["head", "lora"]
    assert sorted(r["row"] for r in merged["runs"]) == ["head", "head", "lora", "lora"]
    assert [r for r in merged["runs"] if r["row"] == "lora"] == [r for r in report["runs"] if r["row"] == "lora"]
    assert list(merged["rerun"]) == ["head"] and merged["wall_s"] == report["wall_s"]
