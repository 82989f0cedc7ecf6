"""Files a user keeps, written so that a crash or a full disk at any point leaves the previous version.

One file (:func:`write_file`): written to a temporary name in the target folder, flushed to disk,
renamed over the target, and the folder entry flushed. A rename within one folder is atomic, so a
reader sees the old file or the new one, never a torn one, whatever filesystem ``$TMPDIR`` is on.

A folder of two files that belong together (:func:`write_pair`, e.g. ``delta.safetensors`` +
``delta.json``): Linux cannot swap a whole folder, so one file (the *record*) carries the SHA-256 of
the other (the *payload*), and the renames run in an order a reader can recover from:

1. the new payload is written under a temporary name, the new record as ``<record>.new``;
2. the payload is renamed into place (the folder now pairs the new payload with the old record,
   and with the new ``<record>.new``);
3. ``<record>.new`` is renamed into place.

:func:`read_pair` returns the record whose digest matches the payload: the record itself, or in
the window between steps 2 and 3, ``<record>.new``. Before step 2 the old pair still matches; after
step 3 the new one does. A pair that matches in neither way (files from two writers, a payload
edited by hand) is refused, never loaded. Writers into one folder take turns (an exclusive ``flock``
on the folder itself, where the platform has ``fcntl``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from lightning_delta.errors import CheckpointReadError

NEW_SUFFIX = ".new"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without folder handles (Windows): the rename itself is what we have
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temporary(folder: Path, name: str, data: bytes | Callable[[object], None]) -> Path:
    """``data`` (bytes, or a function writing to a binary file) in a new, flushed temporary file in ``folder``."""
    fd, temp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, bytes):
                f.write(data)
            else:
                data(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    return Path(temp)


def write_file(path: str | Path, data: bytes | Callable[[object], None]) -> Path:
    """Writes ``data`` to ``path`` atomically: a failure at any point leaves ``path`` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = _temporary(path.parent, path.name, data)
    try:
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    _fsync_folder(path.parent)
    return path


@contextlib.contextmanager
def folder_lock(folder: Path, shared: bool = False) -> Iterator[None]:
    """Writers (exclusive) and readers (``shared``) of ``folder`` take turns, where the filesystem has
    ``flock`` on folders; where it has not (NFS, Lustre without ``-o flock``) they go on unlocked: the
    digests still refuse a mixed pair."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux
        yield
        return
    fd = os.open(folder, os.O_RDONLY)  # the folder itself: no lock file left beside the user's files
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


def _clean_stale(folder: Path, names: tuple[str, ...]) -> None:
    for name in names:
        for stale in folder.glob(f".{name}.*.tmp"):
            with contextlib.suppress(OSError):
                stale.unlink()


def write_pair(folder: str | Path, payload_name: str, payload: bytes, record_name: str,
               record: Callable[[str], bytes]) -> Path:
    """Writes ``payload`` and ``record(sha256(payload))`` into ``folder`` so that the folder reads back
    (with :func:`read_pair`) as the old pair or the new one at every instant (see the module notes)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    record_bytes = record(sha256(payload))
    with folder_lock(folder):
        _clean_stale(folder, (payload_name, record_name))
        temp_payload = _temporary(folder, payload_name, payload)
        try:
            write_file(folder / (record_name + NEW_SUFFIX), record_bytes)
            os.replace(temp_payload, folder / payload_name)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp_payload)
            raise
        _fsync_folder(folder)
        os.replace(folder / (record_name + NEW_SUFFIX), folder / record_name)
        _fsync_folder(folder)
    return folder


def read_pair(folder: str | Path, payload_name: str, record_name: str,
              recorded_digest: Callable[[bytes], str | None]) -> tuple[bytes, bytes]:
    """The payload and the record that belongs to it.

    ``recorded_digest(record_bytes)`` reads the payload digest a record holds (``None``: a record
    written before digests, or by another tool, taken as it is). A pending ``<record>.new`` whose
    digest matches the payload wins over the record: a save stopped between its two renames.

    Raises:
        CheckpointReadError: a file is missing, or the files do not belong together.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointReadError(f"{str(folder)!r} is not a folder ({payload_name} + {record_name})")

    def read(name: str) -> bytes:
        try:
            return (folder / name).read_bytes()
        except OSError as err:
            raise CheckpointReadError(f"{str(folder)!r} is not a readable folder ({payload_name} + {record_name}):"
                                      f" {err}") from err

    with folder_lock(folder, shared=True):
        payload = read(payload_name)
        actual = sha256(payload)
        try:
            pending = (folder / (record_name + NEW_SUFFIX)).read_bytes()
        except OSError:
            pending = None
        if pending is not None:
            try:
                matches = recorded_digest(pending) == actual
            except CheckpointReadError:  # a stale, unreadable leftover: the record decides
                matches = False
            if matches:
                return payload, pending
        record = read(record_name)
    expected = recorded_digest(record)
    if expected is None or expected == actual:
        return payload, record
    raise CheckpointReadError(
        f"{str(folder)!r}: {payload_name} does not belong to {record_name} (SHA-256 {actual[:12]}... where the"
        f" record says {expected[:12]}...): the files come from different saves or were changed; save again")


def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Reads a ``.ckpt`` / ``.pt`` file with ``torch.load(weights_only=True)``.

    Raises:
        CheckpointReadError: missing, truncated or corrupt file, or one that needs full unpickling.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointReadError(f"no checkpoint file at {str(path)!r}")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "GLOBAL" not in str(err):  # a torn or garbled file, not a pickled Python object
            raise CheckpointReadError(f"cannot read {str(path)!r}: the file is truncated or corrupt") from err
        raise CheckpointReadError(
            f"{str(path)!r} holds Python objects beyond tensors and plain containers; lightning_delta refuses to"
            " unpickle it. If you trust the file, read it yourself with torch.load(path, weights_only=False)"
            f" and pass the dict ({str(err).splitlines()[0]})"
        ) from err
    except Exception as err:  # garbage makes torch's reader fail in many ways (IndexError, struct.error, ...)
        raise CheckpointReadError(f"cannot read {str(path)!r}: the file is truncated or corrupt"
                                  f" ({type(err).__name__}: {err})") from err
    if not isinstance(data, dict):
        raise CheckpointReadError(f"{str(path)!r} holds a {type(data).__name__}, not a checkpoint dict")
    return data
