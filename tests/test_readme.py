"""The README's code as written: every python block runs (placeholders such as ``MyTask`` and ``dm``
bound to tiny local stand-ins) or, where it is a method body out of context, compiles; every
``lightning-delta`` command line in it names a subcommand and files that exist."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

from models import PlainNet, family_inputs, plain_inputs, save_tiny, tiny_bert

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, flags=re.S)
PYTHON = [code for lang, code in BLOCKS if lang == "python"]


def block(marker: str) -> str:
    (found,) = [code for code in PYTHON if marker in code]
    return found


def test_every_python_block_is_run_or_compiled_here():
    run = [block("MyTask()"), block("ld.attach(model"), block('set_active("task_b")')]
    for code in PYTHON:
        compile(code, "README.md", "exec")  # the fragments (method bodies) at least parse
    assert len(run) == 3 and len(PYTHON) >= 3


def test_usage_block_trains_resumes_and_loads_for_inference(tmp_path, monkeypatch):
    from lightning_delta import DeltaModel
    from lightning_delta.data import SyntheticSentimentData
    from lightning_delta.tasks import SequenceClassification

    source = save_tiny("bert", tmp_path / "bert")
    monkeypatch.chdir(tmp_path)
    namespace = {
        "MyTask": lambda: SequenceClassification(model=source, num_labels=2),
        "dm": SyntheticSentimentData(num_train=32, num_val=16, batch_size=16, tokenizer=source),
    }
    exec(compile(block("MyTask()"), "README.md", "exec"), namespace)
    inference = namespace["inference"]
    assert isinstance(inference, SequenceClassification) and not inference.training
    assert namespace["more"].current_epoch == 4 and namespace["trainer"].current_epoch == 3
    handle = DeltaModel(inference)
    assert set(handle.configs) == {"lora"} and handle.deltas()
    trained = torch.load(namespace["last"], weights_only=True)["state_dict"]
    loaded = inference.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in trained.items() if ".lora." in k)


def test_plain_module_block_attaches_merges_and_detaches_exactly(capsys):
    model = PlainNet().eval()
    ids = plain_inputs()
    before = model(ids)
    namespace = {"model": model}
    exec(compile(block("ld.attach(model"), "README.md", "exec"), namespace)
    assert "trainable" in capsys.readouterr().out
    torch.testing.assert_close(model(ids), before, rtol=0, atol=0)
    assert not any("lora" in n for n, _ in model.named_modules())


def test_multitask_block_runs(tmp_path, monkeypatch):
    from lightning_delta import LoraConfig, attach

    monkeypatch.chdir(tmp_path)
    model = tiny_bert().eval()
    handle = attach(model, [LoraConfig(name="task_a"), LoraConfig(name="task_b")])
    namespace = {"model": model, "handle": handle, "batch": family_inputs("bert", batch=3),
                 "save_delta": __import__("lightning_delta").save_delta}
    exec(compile(block('set_active("task_b")'), "README.md", "exec"), namespace)
    assert (tmp_path / "task_b" / "delta.safetensors").is_file() and "both" in handle.configs
    assert namespace["logits"].shape[0] == 3


COMMANDS = sorted({line.strip() for lang, code in BLOCKS if lang == "bash" for line in code.splitlines()
                   if line.strip().startswith("lightning-delta ")} |
                  {m.strip() for m in re.findall(r"`(lightning-delta [^`]+)`", README)})


@pytest.mark.parametrize("line", COMMANDS)
def test_command_lines_name_a_subcommand_and_shipped_files(line):
    from lightning_delta.cli import SUBCOMMANDS

    words = shlex.split(line.split("#")[0])
    assert words[1] in SUBCOMMANDS or words[1] in ("--help", "-h", "<command>"), line
    for i, word in enumerate(words):
        if words[i - 1] in ("--config", "-c") and not word.startswith("<"):
            assert (ROOT / word).is_file(), f"{line}: {word} does not exist"
