"""Lightning checkpoints written atomically in their own folder.

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction whose temporary file lies in
``$TMPDIR``; when the checkpoint folder is on another filesystem, the final move is a copy, and a
crash during it leaves a torn ``last.ckpt`` in place of the good one. :class:`AtomicCheckpointIO`
writes into a temporary file beside the target, flushes it and renames it over the target
(:func:`lightning_delta.files.write_file`). ``DeltaCallback`` installs it when the strategy uses
Lightning's default; it also reads ``Trainer.fit(ckpt_path=...)`` with the library's checks
(``weights_only=True``, a :class:`~lightning_delta.errors.CheckpointReadError` for a torn file).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

from lightning_delta.files import read_checkpoint, write_file


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose files are replaced atomically, in the target's own folder."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: fsspec's own semantics
            return super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        write_file(path, lambda f: torch.save(checkpoint, f))

    @override
    def load_checkpoint(self, path: _PATH, map_location: Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """A local file is read with ``weights_only=True`` unless the caller asks otherwise, and a missing,
        torn or foreign file is a :class:`~lightning_delta.errors.CheckpointReadError` naming it."""
        if weights_only is False or "://" in str(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        return read_checkpoint(path, map_location)
