"""What a newcomer sees from the real ``lightning-delta`` command (a subprocess, as typed in a shell):
the method switch, short errors for their mistakes, the checkpoint paths, no noise, a quick help."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from models import save_tiny

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
SHORT = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
         "--trainer.enable_progress_bar=false", "--data.init_args.num_train=32", "--data.init_args.num_val=16"]
NOISE = ("Failed to load", "torch/utils/_pytree.py", "kernels-community", "warnings.warn(")  # torchao's import


def command() -> list[str]:
    script = Path(sys.executable).parent / "lightning-delta"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "lightning_delta.cli"]


def run(*args: str, cwd=None, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "LIGHTNING_DELTA_DEBUG"}
    environment.update({"HF_HUB_OFFLINE": "1", **(env or {})})
    return subprocess.run([*command(), *args], capture_output=True, text=True, cwd=cwd or ROOT, env=environment,
                          timeout=600)


def error_block(done: subprocess.CompletedProcess) -> list[str]:
    """The command's own stderr lines (a test environment's torchao prints import noise of its own)."""
    return [line for line in done.stderr.splitlines() if line.strip() and not any(n in line for n in NOISE)]


def assert_short_error(done: subprocess.CompletedProcess, *expected: str) -> str:
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    lines = error_block(done)
    start = next(i for i, line in enumerate(lines) if "error:" in line)
    block = lines[start:]
    assert len(block) <= 3, block
    text = "\n".join(block)
    for piece in expected:
        assert piece in text, text
    return text


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    return save_tiny("bert", tmp_path_factory.mktemp("tiny") / "bert")


def tiny(path) -> list[str]:
    return [f"--model.init_args.model={path}"]


# 1. switching the method gives its own placement; one place for targets ----------------------------
def test_switching_the_method_either_way_gives_its_own_placement():
    configs = []
    for method in ("lightning_delta.BitFitConfig", "bitfit"):
        done = run("fit", "--config", QUICKSTART, f"--delta.method={method}", "--print_config")
        assert done.returncode == 0, done.stderr[-2000:]
        configs.append(yaml.safe_load(done.stdout)["delta"]["method"])
    assert configs[0] == configs[1]
    assert configs[0]["class_path"] == "lightning_delta.BitFitConfig" and configs[0]["init_args"]["targets"] is None
    named = run("fit", "--config", QUICKSTART, "--delta.method=ia3", "--delta.method.init_args.targets=[key]",
                "--print_config")
    assert yaml.safe_load(named.stdout)["delta"]["method"]["init_args"]["targets"] == ["key"]


def test_bitfit_switched_from_the_lora_config_trains_every_bias(tmp_path, tiny_bert_dir):
    done = run("fit", "--config", QUICKSTART, "--delta.method=lightning_delta.BitFitConfig", *SHORT,
               *tiny(tiny_bert_dir), f"--trainer.default_root_dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-3000:]
    (last,) = tmp_path.glob("lightning_logs/version_0/checkpoints/last.ckpt")
    keys = [k for k in torch.load(last, weights_only=True)["state_dict"] if "bitfit" in k]
    assert any(".intermediate." in k or ".output." in k for k in keys), keys  # not only query/value


def test_delta_targets_beside_a_method_config_is_refused_with_the_one_place():
    assert_short_error(run("fit", "--config", QUICKSTART, "--delta.targets=[key]", "--trainer.max_epochs=0"),
                       "delta.method.init_args.targets")


# 2. a user's mistake: one short block, exit 2; --debug shows the traceback ----------------------------
def test_unknown_method_says_what_was_meant():
    assert_short_error(run("fit", "--config", QUICKSTART, "--delta.method=lroa"), "'lroa'", "did you mean 'lora'")


def test_target_matching_nothing_names_it(tiny_bert_dir):
    assert_short_error(run("fit", "--config", QUICKSTART, "--delta.method.init_args.targets=[qurey]", *SHORT,
                           *tiny(tiny_bert_dir)), "'qurey'", "attention.self.query")


def test_missing_data_file_names_it(tmp_path):
    missing = tmp_path / "train.csv"
    assert_short_error(run("fit", "--config", QUICKSTART, "--data=lightning_delta.data.TextClassificationData",
                           f"--data.init_args.data_files={{train: {missing}}}"), str(missing))


def test_hub_name_offline_names_the_model_and_the_fix():
    assert_short_error(run("fit", "--config", QUICKSTART, "--model.init_args.model=someone/not-a-model"),
                       "'someone/not-a-model'", "local folder")


def test_typo_in_a_yaml_config_is_named_without_the_usage(tmp_path):
    config = yaml.safe_load(Path(QUICKSTART).read_text())
    config["delta"]["trainabel"] = config["delta"].pop("trainable")
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(config))
    text = assert_short_error(run("fit", "--config", str(path)), "trainabel")
    assert "usage:" not in text


def test_prefix_on_a_model_without_a_cache_says_what_works(tmp_path):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from models import bundled_tokenizer

    folder = tmp_path / "deberta"
    config = AutoConfig.for_model("deberta-v2", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, vocab_size=len(bundled_tokenizer()), pooler_hidden_size=32)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    bundled_tokenizer().save_pretrained(folder)
    assert_short_error(run("fit", "--config", QUICKSTART, "--delta.method=prefix", *SHORT, *tiny(folder)),
                       "prefix", "'lora'")


def test_debug_shows_the_traceback():
    done = run("fit", "--config", QUICKSTART, "--delta.method=lroa", "--debug")
    assert done.returncode != 0 and "Traceback" in done.stderr and "did you mean 'lora'" in done.stderr
    env_done = run("fit", "--config", QUICKSTART, "--delta.method=lroa", env={"LIGHTNING_DELTA_DEBUG": "1"})
    assert "Traceback" in env_done.stderr


# 3. export --to peft without PEFT: the extra to install, nothing written ------------------------------
def test_export_to_peft_without_peft_names_the_extra_and_writes_nothing(tmp_path, tiny_bert_dir):
    done = run("fit", "--config", QUICKSTART, *SHORT, *tiny(tiny_bert_dir), f"--trainer.default_root_dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-3000:]
    (ckpt,) = tmp_path.glob("lightning_logs/version_0/checkpoints/last.ckpt")
    hide = tmp_path / "hide"
    (hide / "peft").mkdir(parents=True)
    (hide / "peft" / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'peft'\", name='peft')\n")
    out = tmp_path / "adapter"
    gone = run("export", "--ckpt", str(ckpt), "--to", "peft", str(out), env={"PYTHONPATH": str(hide)})
    assert_short_error(gone, 'pip install "lightning-delta[peft]"')
    assert not out.exists()


# 4. where the checkpoints went ---------------------------------------------------------------------
def test_fit_prints_the_best_and_last_checkpoint_paths(tmp_path, tiny_bert_dir):
    done = run("fit", "--config", QUICKSTART, *SHORT, *tiny(tiny_bert_dir), f"--trainer.default_root_dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-3000:]
    paths = {line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip()
             for line in done.stdout.splitlines() if line.strip().startswith(("best:", "last:"))}
    assert set(paths) == {"best", "last"}, done.stdout[-2000:]
    assert all(Path(ROOT, p).is_file() for p in paths.values())
    # and the printed path is what `test` takes
    tested = run("test", "--config", QUICKSTART, *tiny(tiny_bert_dir), "--trainer.enable_progress_bar=false",
                 "--data.init_args.num_val=16", f"--ckpt_path={paths['best']}",
                 f"--trainer.default_root_dir={tmp_path}")
    assert tested.returncode == 0, tested.stderr[-3000:]
    # 6. noise: no loading report of a head the checkpoint restores, no Lightning internals
    for noise in ("newly initialized", "MISSING", "LeafSpec", "Map:"):
        assert noise not in tested.stdout + tested.stderr
        assert noise not in done.stdout + done.stderr


def test_inspect_prints_no_lightningcli_warning():
    done = run("inspect", "--config", QUICKSTART, "--plain", "--depth", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "not recommended" not in done.stdout + done.stderr and "trainable" in done.stdout


# 8. help -------------------------------------------------------------------------------------------
def test_help_lists_every_command_without_importing_lightning():
    done = run("--help")
    assert done.returncode == 0
    for name in ("fit", "validate", "test", "predict", "export", "merge", "inspect"):
        assert f"\n  {name} " in done.stdout
    probe = subprocess.run([sys.executable, "-c", "import sys; from lightning_delta.cli import main; main(['--help']);"
                            " print('LIGHTNING' if 'lightning.pytorch' in sys.modules else 'QUICK')"],
                           capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip().endswith("QUICK")


def test_fit_help_lists_methods_and_ready_tasks_but_no_internal_bases():
    done = run("fit", "--help")
    assert done.returncode == 0
    for internal in ("lightning_delta.DeltaConfig,", "WholeModelConfig", "VirtualTokensConfig"):
        assert internal not in done.stdout
    assert "lightning_delta.LoraConfig" in done.stdout and "lightning_delta.tasks.SequenceClassification" in done.stdout
    lines = done.stdout.splitlines()
    delta = next(i for i, line in enumerate(lines) if line.strip().startswith("--delta CONFIG"))
    trainer = next(i for i, line in enumerate(lines) if line.strip().startswith("--trainer CONFIG"))
    assert delta < trainer < len(lines), "the delta section comes before Lightning's trainer options"


def test_unknown_command_is_named():
    assert_short_error(run("fti"), "'fti'", "did you mean 'fit'")
