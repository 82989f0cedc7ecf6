"""Share a delta on the Hugging Face Hub: PEFT's adapter format plus a generated model card.

``push_to_hub(model, "me/bert-sst2-lora", metrics={"val_acc": 0.91})`` writes the adapter
(:func:`lightning_delta.peft_format.export_peft`) and a ``README.md`` (method, targets, hyper-parameters,
trainable share, metrics, how to load it) into a temporary folder and uploads that folder. Anyone
loads it with ``peft.PeftModel.from_pretrained(base_model, "me/bert-sst2-lora")``, or with
``lightning_delta.load_delta(base_model, local_folder)``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from lightning_delta.peft_format import export_peft
from lightning_delta.handle import DeltaModel
from lightning_delta.version import __version__


def _targets(paths: list[str]) -> str:
    """``query, value`` for ``...layer.0.attention.self.query`` and the like: the distinct last names."""
    names = list(dict.fromkeys(p.rsplit(".", 1)[-1] for p in paths if p))
    return ", ".join(f"`{n}`" for n in names) if names else "the whole model (inputs)"


def model_card(model: nn.Module, repo_id: str, name: str | None = None,
               metrics: Mapping[str, float] | None = None) -> str:
    """The README of a delta repository: front matter for the Hub, then what the delta is and how to load it."""
    handle = DeltaModel(model)
    configs = handle.configs
    name = name or next(iter(configs))
    config = configs[name]
    summary = handle.summary()
    base = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    share = 100 * summary.trainable / max(summary.total, 1)
    hparams = ", ".join(f"{k}={v!r}" for k, v in config.hparams().items() if k != "delta_dtype")
    lines = [
        "---",
        "library_name: peft",
        *([f"base_model: {base}"] if "/" in base and not base.startswith(("/", ".")) else []),
        "tags:",
        "- lightning-delta",
        f"- {config.method}",
        "---",
        "",
        f"# {repo_id}",
        "",
        f"A **{config.method}** delta for `{base}`, trained with lightning_delta {__version__}: the backbone",
        "stays frozen; only the delta (and any module listed under trainable) was trained.",
        "",
        "| | |",
        "| --- | --- |",
        f"| method | `{config.method}` ({hparams or 'defaults'}) |",
        f"| targets | {_targets([d.target_path for d in handle.deltas(name)])} |",
        f"| trainable parameters | {summary.trainable:,} of {summary.total:,} ({share:.3f}%) |",
    ]
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {float(v):.4f} |" for k, v in metrics.items()]
    lines += [
        "", "## Use", "", "```python",
        "from peft import PeftModel", "",
        f"model = PeftModel.from_pretrained(base_model, {repo_id!r})  # base_model: {base}",
        "```", "",
        f"or, with lightning_delta: `lightning_delta.load_delta(base_model, <downloaded folder of {repo_id}>)`.",
        "",
    ]
    return "\n".join(lines)


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    name: str | None = None,
    metrics: Mapping[str, float] | None = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload delta (lightning_delta)",
    api: Any = None,
) -> str:
    """Uploads delta ``name`` of ``model`` (the backbone it is attached to) in PEFT's format, with a model card.

    Args:
        repo_id: ``"user/repo"``; created (``exist_ok``) if missing.
        metrics: numbers for the card, e.g. ``trainer.callback_metrics`` values.
        private: create the repository private.
        token: a Hub token (default: the logged-in one).
        api: a ``huggingface_hub.HfApi`` (default: a new one with ``token``).

    Returns:
        The URL of the upload commit.

    Raises:
        DeltaConfigError: the delta has no PEFT equivalent (see :func:`~lightning_delta.peft_format.export_peft`),
            raised before anything is uploaded.
    """
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as folder:
        export_peft(model, folder, name=name)
        (Path(folder) / "README.md").write_text(model_card(model, repo_id, name, metrics))
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message,
                                   repo_type="model")
    return str(getattr(commit, "commit_url", commit))
