"""The example scripts run as a user would run them."""

import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(*args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_custom_module_then_inference_from_its_delta(tmp_path):
    ckpt = tmp_path / "sentiment.ckpt"
    run(str(EXAMPLES / "custom_module.py"), "--steps", "40", "--out", str(ckpt))
    assert ckpt.stat().st_size < 2_000_000
    texts = ["What a superb and delightful concert.", "The food was dull and awful."]
    lines = run(str(EXAMPLES / "inference_from_delta.py"), "--ckpt", str(ckpt), *texts).strip().splitlines()
    merged = run(str(EXAMPLES / "inference_from_delta.py"), "--ckpt", str(ckpt), "--merge", *texts).strip().splitlines()
    assert [line.split("\t")[1] for line in lines] == ["positive", "negative"]
    probs = [float(line.split("\t")[0]) for line in lines]
    assert [float(line.split("\t")[0]) for line in merged] == probs
