"""The README and the pages under docs/ as written: every python block runs (placeholders such as
``MyTask`` and ``dm`` bound to tiny local stand-ins) or, where it is a method body out of context,
compiles; every ``lightning-delta`` command line names a subcommand and files that exist; every
relative link resolves; the README stays a front page that links every page."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

from models import PlainNet, family_inputs, plain_inputs, save_tiny, tiny_bert

ROOT = Path(__file__).resolve().parents[1]
PAGES = {path.relative_to(ROOT).as_posix(): path.read_text()
         for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}
README = PAGES["README.md"]
BLOCKS = [(page, lang, code) for page, text in PAGES.items()
          for lang, code in re.findall(r"```(\w+)\n(.*?)```", text, flags=re.S)]
PYTHON = [(page, code) for page, lang, code in BLOCKS if lang == "python"]


def block(marker: str) -> str:
    (found,) = [code for _, code in PYTHON if marker in code]
    return found


def test_every_python_block_is_run_or_compiled_here():
    run = [block("MyTask()"), block("ld.attach(model"), block('set_active("task_b")'), block('"experts.gate_up_proj"')]
    for page, code in PYTHON:
        compile(code, page, "exec")  # the fragments (method bodies) at least parse
    assert len(run) == 4 and len(PYTHON) >= 4


def test_the_readme_is_a_front_page_that_links_every_page():
    assert len(README.splitlines()) <= 250
    pages = {page for page in PAGES if page.startswith("docs/")}
    assert len(pages) >= 6 and all(f"]({page})" in README for page in pages), pages


@pytest.mark.parametrize("page", sorted(PAGES))
def test_relative_links_resolve(page):
    folder = (ROOT / page).parent
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", PAGES[page]):
        if "://" not in target:
            assert (folder / target).exists(), f"{page}: link to {target} does not exist"


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


def test_expert_block_puts_a_pair_on_every_expert_and_trains_only_deltas(capsys):
    namespace: dict = {}
    exec(compile(block('"experts.gate_up_proj"'), "docs/methods.md", "exec"), namespace)
    assert "torch.Size([4, 8, 16])" in capsys.readouterr().out
    model = namespace["model"]
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "model.layers.1.mlp.experts.lora.B.down_proj" in trained and all(".lora." in n for n in trained)


def test_multitask_block_runs(tmp_path, monkeypatch):
    from lightning_delta import LoraConfig, attach

    monkeypatch.chdir(tmp_path)
    model = tiny_bert().eval()
    handle = attach(model, [LoraConfig(name="task_a"), LoraConfig(name="task_b")])
    namespace = {"model": model, "handle": handle, "batch": family_inputs("bert", batch=3),
                 "save_delta": __import__("lightning_delta").save_delta}
    exec(compile(block('set_active("task_b")'), "docs/sharing.md", "exec"), namespace)
    assert (tmp_path / "task_b" / "delta.safetensors").is_file() and "both" in handle.configs
    assert namespace["logits"].shape[0] == 3


COMMANDS = sorted({line.strip() for _, lang, code in BLOCKS if lang == "bash" for line in code.splitlines()
                   if line.strip().startswith("lightning-delta ")} |
                  {m.strip() for text in PAGES.values() for m in re.findall(r"`(lightning-delta [^`]+)`", text)})


@pytest.mark.parametrize("line", COMMANDS)
def test_command_lines_name_a_subcommand_and_shipped_files(line):
    from lightning_delta.cli import SUBCOMMANDS

    words = shlex.split(line.split("#")[0])
    assert words[1] in SUBCOMMANDS or words[1] in ("--help", "-h", "<command>"), line
    for i, word in enumerate(words):
        if words[i - 1] in ("--config", "-c") and not word.startswith("<"):
            assert (ROOT / word).is_file(), f"{line}: {word} does not exist"


def test_the_optimizer_fragment_gives_each_delta_its_own_rate():
    import lightning_delta
    from lightning_delta import BitFitConfig, LoraConfig, attach

    model = tiny_bert()
    attach(model, [LoraConfig(targets=["query"]), BitFitConfig()]).freeze_backbone(trainable="classifier")
    namespace = {"lightning_delta": lightning_delta, "torch": torch}
    exec(compile(block("def configure_optimizers(self):"), "docs/api.md", "exec"), namespace)
    optimizer = namespace["configure_optimizers"](model)
    rates = {group["lr"] for group in optimizer.param_groups}
    assert {LoraConfig().lr, BitFitConfig().lr} <= rates
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == sum(
        p.numel() for p in model.parameters() if p.requires_grad)


YAML = [(page, code) for page, lang, code in BLOCKS if lang == "yaml"]


@pytest.mark.parametrize("page,code", YAML, ids=[f"{page}:{i}" for i, (page, _) in enumerate(YAML)])
def test_yaml_blocks_parse_and_name_classes_that_exist(page, code):
    import importlib

    import yaml

    config = yaml.safe_load(code)
    paths = re.findall(r"class_path: ([\w.]+)", code)
    assert isinstance(config, dict) and paths
    for path in paths:
        module, _, name = path.rpartition(".")
        assert hasattr(importlib.import_module(module), name), f"{page}: {path} does not exist"
