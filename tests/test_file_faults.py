"""Bad files and faults through every load and save path: each one raises the library's own error,
naming the file or the value, and leaves the model and the files on disk exactly as they were."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import tempfile
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

from lightning_delta import (
    CheckpointReadError,
    DeltaCallback,
    DeltaConfigError,
    DeltaModel,
    DeltaStateError,
    LoraConfig,
    NonFiniteError,
    TargetError,
    attach,
    export_peft,
    import_peft,
    load_delta,
    save_delta,
)
from lightning_delta.checkpoint import META_KEY, checkpoint_metadata
from lightning_helpers import save_pretrained_bert
from models import tiny_bert


def lora_model(seed: int = 0):
    torch.manual_seed(seed)
    model = tiny_bert().eval()
    handle = attach(model, "lora", r=2).freeze_backbone(trainable="classifier")
    with torch.no_grad():
        for p in handle.delta_parameters():
            p.add_(0.1)
    return model


def poisoned(path: Path, value: float) -> dict:
    ckpt = torch.load(path, weights_only=True)
    key = next(k for k in ckpt["state_dict"] if k.endswith("lora.B"))
    ckpt["state_dict"][key] = torch.full_like(ckpt["state_dict"][key], value)
    return ckpt


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-checkpoint",))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    save_pretrained_bert(root / "pretrained")
    model = lora_model()
    save_delta(model, root / "good")
    ckpt = {"state_dict": DeltaModel(model).delta_state_dict(), META_KEY: checkpoint_metadata(model, "")}
    torch.save(ckpt, root / "good.ckpt")
    data = (root / "good.ckpt").read_bytes()
    (root / "empty.ckpt").write_bytes(b"")
    (root / "torn.ckpt").write_bytes(data[: len(data) // 3])
    (root / "random.ckpt").write_bytes(random.Random(0).randbytes(4096))
    torch.save([1, 2, 3], root / "list.ckpt")
    torch.save({"state_dict": {}, "x": Evil()}, root / "evil.ckpt")
    torch.save(poisoned(root / "good.ckpt", float("nan")), root / "nan.ckpt")
    torch.save(poisoned(root / "good.ckpt", float("inf")), root / "inf.ckpt")
    (root / "empty-dir").mkdir()

    def folder(name: str, change) -> None:
        target = root / name
        target.mkdir()
        for f in (root / "good").iterdir():
            (target / f.name).write_bytes(f.read_bytes())
        change(target)

    folder("no-json", lambda d: (d / "delta.json").unlink())
    folder("no-tensors", lambda d: (d / "delta.safetensors").unlink())
    folder("zero-tensors", lambda d: (d / "delta.safetensors").write_bytes(b""))
    folder("torn-tensors",
           lambda d: (d / "delta.safetensors").write_bytes((d / "delta.safetensors").read_bytes()[:99]))
    folder("random-tensors", lambda d: (d / "delta.safetensors").write_bytes(random.Random(1).randbytes(2048)))
    folder("bad-json", lambda d: (d / "delta.json").write_text("{not json"))
    folder("list-json", lambda d: (d / "delta.json").write_text("[1, 2]"))
    folder("empty-json", lambda d: (d / "delta.json").write_text(""))
    other = lora_model(seed=1)
    with torch.no_grad():
        for p in DeltaModel(other).delta_parameters():
            p.mul_(3)
    save_delta(other, root / "other")
    folder("mixed",
           lambda d: (d / "delta.safetensors").write_bytes((root / "other" / "delta.safetensors").read_bytes()))

    def edit(d: Path, value: float, keep_digest: bool) -> None:
        tensors = load_file(d / "delta.safetensors")
        key = next(k for k in tensors if k.endswith("lora.B"))
        tensors[key] = torch.full_like(tensors[key], value)
        save_file(tensors, d / "delta.safetensors", metadata={"format": "lightning_delta"})
        if not keep_digest:  # an old-format record, written before digests: taken as it is
            record = json.loads((d / "delta.json").read_text())
            record.pop("tensors_sha256")
            (d / "delta.json").write_text(json.dumps(record))

    folder("edited", lambda d: edit(d, 0.5, keep_digest=True))
    folder("old-nan", lambda d: edit(d, float("nan"), keep_digest=False))

    def record(d: Path, change) -> None:
        data = json.loads((d / "delta.json").read_text())
        data.pop("tensors_sha256")
        change(data)
        (d / "delta.json").write_text(json.dumps(data))

    folder("unknown-method", lambda d: record(d, lambda r: r["specs"][0].update(method="lroa")))
    folder("inf-alpha", lambda d: record(d, lambda r: r["specs"][0].update(alpha=float("inf"))))
    folder("bad-regex", lambda d: record(d, lambda r: r["specs"][0].update(targets=["re:["])))

    base = tiny_bert().eval()
    trained = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["query"]))
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(0.2)
    trained.save_pretrained(str(root / "peft"))

    def peft_folder(name: str, change) -> None:
        target = root / name
        target.mkdir()
        for f in (root / "peft").iterdir():
            (target / f.name).write_bytes(f.read_bytes())
        change(target)

    def peft_tensor(d: Path, change) -> None:
        tensors = load_file(d / "adapter_model.safetensors")
        key = next(k for k in tensors if k.endswith("lora_A.weight"))
        tensors[key] = change(tensors[key])
        save_file(tensors, d / "adapter_model.safetensors", metadata={"format": "pt"})

    peft_folder("peft-bad-json", lambda d: (d / "adapter_config.json").write_text("{"))
    peft_folder("peft-no-config", lambda d: (d / "adapter_config.json").unlink())
    peft_folder("peft-random",
                lambda d: (d / "adapter_model.safetensors").write_bytes(random.Random(2).randbytes(1024)))
    peft_folder("peft-transposed", lambda d: peft_tensor(d, lambda t: t.T.contiguous()))
    peft_folder("peft-nan", lambda d: peft_tensor(d, lambda t: torch.full_like(t, float("nan"))))
    peft_folder("peft-rank", lambda d: peft_tensor(d, lambda t: torch.cat([t, t])))
    peft_folder("peft-type", lambda d: (d / "adapter_config.json").write_text(json.dumps(
        {**json.loads((d / "adapter_config.json").read_text()), "peft_type": "NOT_A_METHOD"})))
    peft_folder("peft-pickle", lambda d: ((d / "adapter_model.safetensors").unlink(),
                                          torch.save({}, d / "adapter_model.bin")))
    ours = lora_model()
    export_peft(ours, root / "exported")
    other_rank = tiny_bert().eval()
    attach(other_rank, "lora", r=4).freeze_backbone(trainable="classifier")
    export_peft(other_rank, root / "exported-other")
    peft_folder("exported-mixed", lambda d: [
        (d / f.name).write_bytes(f.read_bytes()) for f in (root / "exported").iterdir()] and
        (d / "adapter_model.safetensors").write_bytes((root / "exported-other" / "adapter_model.safetensors")
                                                     .read_bytes()))
    return root


def files_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def model_snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
            sorted(DeltaModel(model).configs))


def unchanged(a, b) -> bool:
    return (a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
            and a[1:] == b[1:])


def load(name, **kwargs):
    return lambda model, root: load_delta(model, root / name, **kwargs)


def plain_load(name):
    """Into a plain backbone, as inference does (the file's deltas are attached by the load)."""
    return lambda model, root: load_delta(tiny_bert().eval(), root / name)


def peft_import(name):
    return lambda model, root: import_peft(model, root / name)


def fit_from(name):
    def act(model, root):
        import lightning.pytorch as pl

        from lightning_helpers import Classifier, loader

        trainer = pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                             enable_model_summary=False, callbacks=[DeltaCallback("lora", r=2)],
                             default_root_dir=tempfile.mkdtemp())
        trainer.fit(Classifier(str(root / "pretrained")), loader(), ckpt_path=str(root / name), weights_only=True)
    return act


def task_from(name):
    def act(model, root):
        from lightning_delta.tasks import SequenceClassification

        os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
        try:
            SequenceClassification.load_from_checkpoint(root / name)
        finally:
            del os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"]
    return act


def save_into(name, prepare):
    def act(model, root):
        prepare(model)
        save_delta(model, root / name)
    return act


def nan_delta(model):
    with torch.no_grad():
        DeltaModel(model).delta_parameters()[0].fill_(float("nan"))


def unfreeze(model):
    for p in model.parameters():
        p.requires_grad_(True)


CASES = [
    # save_delta folders
    ("folder without delta.json", load("no-json"), CheckpointReadError, ["no-json", "delta.json"]),
    ("folder without tensors", load("no-tensors"), CheckpointReadError, ["no-tensors", "delta.safetensors"]),
    ("zero-byte tensors", load("zero-tensors"), CheckpointReadError, ["zero-tensors", "does not belong"]),
    ("torn tensors", load("torn-tensors"), CheckpointReadError, ["torn-tensors", "does not belong"]),
    ("random tensors", load("random-tensors"), CheckpointReadError, ["random-tensors", "delta.safetensors"]),
    ("record not JSON", load("bad-json"), CheckpointReadError, ["bad-json", "not valid JSON"]),
    ("record a JSON list", load("list-json"), CheckpointReadError, ["list-json", "not a delta record"]),
    ("record empty", load("empty-json"), CheckpointReadError, ["empty-json", "JSON"]),
    ("tensors of another save", load("mixed"), CheckpointReadError, ["mixed", "different saves"]),
    ("tensors edited after saving", load("edited"), CheckpointReadError, ["edited", "SHA-256"]),
    ("old-format folder with NaN", load("old-nan"), DeltaStateError, ["lora.B", "NaN"]),
    ("record names an unknown method", load("unknown-method"), DeltaConfigError, ["'lroa'", "did you mean"]),
    ("record with alpha=inf", load("inf-alpha"), DeltaConfigError, ["alpha=inf", "finite"]),
    ("record with a broken regex target", load("bad-regex"), TargetError, ["'re:['", "regular expression"]),
    ("empty folder", load("empty-dir"), CheckpointReadError, ["empty-dir"]),
    ("folder into a plain backbone, torn", plain_load("torn-tensors"), CheckpointReadError, ["torn-tensors"]),
    # Lightning checkpoint files through load_delta
    ("zero-byte checkpoint", load("empty.ckpt"), CheckpointReadError, ["empty.ckpt", "truncated or corrupt"]),
    ("torn checkpoint", load("torn.ckpt"), CheckpointReadError, ["torn.ckpt", "truncated or corrupt"]),
    ("random checkpoint", load("random.ckpt"), CheckpointReadError, ["random.ckpt"]),
    ("checkpoint holding a list", load("list.ckpt"), CheckpointReadError, ["list.ckpt", "not a checkpoint dict"]),
    ("pickle that runs code", load("evil.ckpt"), CheckpointReadError, ["evil.ckpt", "unpickle"]),
    ("checkpoint with NaN delta", load("nan.ckpt"), DeltaStateError, ["lora.B", "NaN"]),
    ("checkpoint with inf delta", load("inf.ckpt"), DeltaStateError, ["lora.B", "infinite"]),
    ("missing checkpoint", load("nowhere.ckpt"), CheckpointReadError, ["nowhere.ckpt"]),
    ("NaN checkpoint into a plain backbone", plain_load("nan.ckpt"), DeltaStateError, ["lora.B", "NaN"]),
    # Trainer.fit(ckpt_path=) and Task.load_from_checkpoint
    ("resume from a zero-byte file", fit_from("empty.ckpt"), CheckpointReadError, ["empty.ckpt"]),
    ("resume from random bytes", fit_from("random.ckpt"), CheckpointReadError, ["random.ckpt"]),
    ("resume from a torn file", fit_from("torn.ckpt"), CheckpointReadError, ["torn.ckpt"]),
    ("resume from a pickle that runs code", fit_from("evil.ckpt"), CheckpointReadError, ["evil.ckpt", "unpickle"]),
    ("load_from_checkpoint of a pickle, torch forced to unpickle", task_from("evil.ckpt"), CheckpointReadError,
     ["evil.ckpt", "unpickle"]),
    ("load_from_checkpoint of a torn file", task_from("torn.ckpt"), CheckpointReadError, ["torn.ckpt"]),
    # PEFT folders
    ("PEFT config not JSON", peft_import("peft-bad-json"), CheckpointReadError, ["peft-bad-json", "adapter_config"]),
    ("PEFT folder without config", peft_import("peft-no-config"), CheckpointReadError, ["peft-no-config"]),
    ("PEFT tensors random", peft_import("peft-random"), CheckpointReadError, ["peft-random", "adapter_model"]),
    ("PEFT lora_A transposed", peft_import("peft-transposed"), DeltaStateError, ["lora_A.weight", "transposed"]),
    ("PEFT lora_A of another rank", peft_import("peft-rank"), DeltaStateError, ["lora_A.weight", "(8, 32)"]),
    ("PEFT tensors NaN", peft_import("peft-nan"), DeltaStateError, ["lora", "NaN"]),
    ("PEFT type unknown", peft_import("peft-type"), DeltaConfigError, ["NOT_A_METHOD"]),
    ("PEFT pickle only", peft_import("peft-pickle"), CheckpointReadError, ["peft-pickle", "adapter_model.bin"]),
    ("exported config with another export's tensors", peft_import("exported-mixed"), CheckpointReadError,
     ["exported-mixed", "different saves"]),
    # values
    ("alpha=inf", lambda m, r: attach(m, "lora", alpha=float("inf"), name="x"), DeltaConfigError, ["alpha=inf"]),
    ("dropout=nan", lambda m, r: attach(m, "lora", dropout=float("nan"), name="x"), DeltaConfigError,
     ["dropout=nan"]),
    ("invalid regex target", lambda m, r: attach(m, "lora", targets="re:(", name="x"), TargetError, ["'re:('"]),
    ("invalid regex exclude", lambda m, r: attach(m, "lora", exclude="re:*", name="x"), TargetError, ["'re:*'"]),
    ("targets given twice", lambda m, r: attach(m, LoraConfig(targets=["key"], name="x"), targets=["query"]),
     DeltaConfigError, ["twice", "['key']"]),
    ("callback trainable matching nothing", lambda m, r: DeltaCallback("bitfit", trainable=["nomatch"]).attach(
        torch.nn.ModuleDict({"model": m})), TargetError, ["'nomatch'"]),
    # saves that must refuse and keep the previous folder
    ("save with a NaN delta", save_into("good", nan_delta), NonFiniteError, ["lora", "NaN"]),
    ("save of a backbone never frozen", save_into("good", unfreeze), DeltaStateError, ["freeze_backbone", "grad"]),
]


@pytest.mark.parametrize(("case", "act", "error", "words"), CASES, ids=[c[0] for c in CASES])
def test_fault_is_named_and_changes_nothing(root, case, act, error, words, monkeypatch):
    monkeypatch.chdir(root)
    model = lora_model()
    before, files = model_snapshot(model), files_digest(root)
    with pytest.raises(error) as raised:
        act(model, root)
    for word in words:
        assert word in str(raised.value), (word, str(raised.value))
    if case not in ("save with a NaN delta", "save of a backbone never frozen"):  # those two change the model first
        assert unchanged(model_snapshot(model), before)
    assert files_digest(root) == files, "files on disk changed"
    assert not (root / "pwned-by-checkpoint").exists()


def test_there_are_at_least_forty_cases():
    assert len(CASES) >= 40


def test_callback_setup_that_fails_rolls_back_so_a_corrected_retry_works(root):
    from lightning_helpers import Classifier

    module = Classifier(str(root / "pretrained"))
    before = model_snapshot(module)
    with pytest.raises(TargetError):
        DeltaCallback("lora", r=2, trainable=["nomatch"]).attach(module)
    assert unchanged(model_snapshot(module), before)
    DeltaCallback("lora", r=2, trainable=["classifier"]).attach(module)  # was "already attached" before the fix
    assert DeltaModel(module).configs


def test_strict_false_names_what_keeps_its_initial_values(root):
    model = tiny_bert().eval()
    ckpt = torch.load(root / "good.ckpt", weights_only=True)
    dropped = sorted(ckpt["state_dict"])[0]
    del ckpt["state_dict"][dropped]
    with pytest.warns(UserWarning, match=dropped.replace(".", r"\.")):
        load_delta(model, ckpt, strict=False)


def test_an_interrupted_folder_save_reads_back_as_the_new_version(root, tmp_path):
    """The window between the two renames: new tensors, old record, new record as delta.json.new."""
    first, second = lora_model(), lora_model(seed=1)
    save_delta(first, tmp_path / "d")
    old_record = (tmp_path / "d" / "delta.json").read_bytes()
    save_delta(second, tmp_path / "d")
    (tmp_path / "d" / "delta.json.new").write_bytes((tmp_path / "d" / "delta.json").read_bytes())
    (tmp_path / "d" / "delta.json").write_bytes(old_record)
    loaded = load_delta(tiny_bert().eval(), tmp_path / "d")
    assert all(torch.equal(a, b) for a, b in zip(DeltaModel(loaded).delta_parameters(),
                                                 DeltaModel(second).delta_parameters(), strict=True))


def test_merge_onto_an_existing_file_fails_and_leaves_it(tmp_path, capsys):
    from lightning_delta.cli import main

    target = tmp_path / "model.bin"
    target.write_bytes(b"keep me")
    ckpt = tmp_path / "x.ckpt"
    torch.save({}, ckpt)
    with pytest.raises(SystemExit) as exit_:
        main(["merge", "--ckpt", str(ckpt), "--out", str(target)])
    assert exit_.value.code == 2 and str(target) in capsys.readouterr().err
    assert target.read_bytes() == b"keep me"


def test_first_save_stopped_between_its_renames_reads_back(tmp_path):
    """No delta.json yet, only the pending delta.json.new beside the tensors it names."""
    model = lora_model()
    save_delta(model, tmp_path / "d")
    (tmp_path / "d" / "delta.json").rename(tmp_path / "d" / "delta.json.new")
    loaded = load_delta(tiny_bert().eval(), tmp_path / "d")
    assert all(torch.equal(a, b) for a, b in zip(DeltaModel(loaded).delta_parameters(),
                                                 DeltaModel(model).delta_parameters(), strict=True))


def test_a_record_without_digest_overwritten_mid_save_reads_as_the_new_version(tmp_path):
    """A folder from before digests (or PEFT's own), re-saved and stopped between the renames."""
    first, second = lora_model(), lora_model(seed=1)
    save_delta(first, tmp_path / "d")
    old = json.loads((tmp_path / "d" / "delta.json").read_text())
    old.pop("tensors_sha256")
    save_delta(second, tmp_path / "d")
    (tmp_path / "d" / "delta.json").rename(tmp_path / "d" / "delta.json.new")
    (tmp_path / "d" / "delta.json").write_text(json.dumps(old))
    loaded = load_delta(tiny_bert().eval(), tmp_path / "d")
    assert all(torch.equal(a, b) for a, b in zip(DeltaModel(loaded).delta_parameters(),
                                                 DeltaModel(second).delta_parameters(), strict=True))


def fit_until_nan(tmp_path, root, when: str, check_finite: bool = True):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_helpers import Classifier, loader

    class Diverging(Classifier):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if when == "loss" and self.global_step >= 3 else loss

        def optimizer_step(self, *args, **kwargs):
            super().optimizer_step(*args, **kwargs)
            if when == "delta" and self.global_step >= 3:
                with torch.no_grad():
                    DeltaModel(self.model).delta_parameters()[0].fill_(float("inf"))

    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1)
    trainer = pl.Trainer(max_epochs=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[DeltaCallback("lora", r=2, check_finite=check_finite), checkpoints],
                         default_root_dir=tmp_path)
    trainer.fit(Diverging(str(root / "pretrained")), loader(n=8, batch_size=2))
    return tmp_path / "ckpt" / "last.ckpt"


@pytest.mark.parametrize("when", ["loss", "delta"])
def test_a_non_finite_loss_or_delta_stops_training_and_keeps_the_last_good_checkpoint(root, tmp_path, when):
    with pytest.raises(NonFiniteError, match="step 3" if when == "loss" else r"lora\.[AB].*step 4") as raised:
        fit_until_nan(tmp_path, root, when)
    assert "check_finite=False" in str(raised.value)
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 3
    assert all(bool(torch.isfinite(t).all()) for t in last["state_dict"].values())


def test_check_finite_false_lets_a_nan_loss_through(root, tmp_path):
    fit_until_nan(tmp_path, root, "loss", check_finite=False)  # no NonFiniteError: the user opted out
