"""Loading splits from the Hugging Face hub or local files, with errors that say how to fix the call."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: File suffix -> (datasets builder, extra builder arguments).
FILE_TYPES: dict[str, tuple[str, dict[str, Any]]] = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
    ".txt": ("text", {}),
}


def _builder(files: Mapping[str, Sequence[str]]) -> tuple[str, dict[str, Any]]:
    kinds = set()
    for split, paths in files.items():
        for path in paths:
            suffix = Path(path).suffix.lower()
            if suffix not in FILE_TYPES:
                raise ValueError(
                    f"data file {path!r} ({split}) has an unknown type {suffix or '(none)'!r}; supported: "
                    f"{', '.join(FILE_TYPES)}"
                )
            if not Path(path).is_file():
                raise FileNotFoundError(f"data file {path!r} ({split}) does not exist")
            if Path(path).stat().st_size == 0:
                raise ValueError(f"data file {path!r} ({split}) is empty; give it rows or leave the split out")
            kinds.add(suffix)
    builders = {FILE_TYPES[k][0] for k in kinds}
    if len(builders) > 1 or kinds == {".csv", ".tsv"}:
        raise ValueError(f"data files mix types {sorted(kinds)}; use one file type for all splits")
    return FILE_TYPES[kinds.pop()]


def load_splits(
    dataset: str | None,
    dataset_config: str | None,
    data_files: Mapping[str, str | Sequence[str]] | None,
) -> Any:
    """A ``datasets.DatasetDict`` from a hub dataset name or from local files by split.

    Raises:
        ValueError: neither or both sources given, unknown file type, or mixed types.
        FileNotFoundError: a data file is missing.
    """
    if (dataset is None) == (not data_files):
        raise ValueError(
            "give exactly one data source: dataset='glue' (with dataset_config='sst2') for the hub, or"
            " data_files={'train': 'train.csv', 'validation': 'dev.csv'} for local files"
        )
    import datasets

    if dataset is not None:
        return datasets.load_dataset(dataset, dataset_config)
    files = {split: [paths] if isinstance(paths, str) else list(paths) for split, paths in data_files.items()}
    builder, kwargs = _builder(files)
    return datasets.load_dataset(builder, data_files=files, **kwargs)


def require_columns(splits: Mapping[str, Any], columns: Mapping[str, str | None]) -> None:
    """Checks every split is non-empty and has every column.

    Args:
        splits: split name -> dataset.
        columns: option name (e.g. ``"label_column"``) -> the column it names (``None``: not used).

    Raises:
        ValueError: naming the empty split, or the missing column, the columns present and the option to fix.
    """
    for split, ds in splits.items():
        if len(ds) == 0:
            raise ValueError(f"split {split!r} is empty; give it rows or leave it out")
        for option, column in columns.items():
            if column is not None and column not in ds.column_names:
                raise ValueError(
                    f"split {split!r} has no column {column!r} ({option}); its columns are {ds.column_names}."
                    f" Name the right one: {option}=<one of those> (CLI: --data.init_args.{option}=...)"
                )
