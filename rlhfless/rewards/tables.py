"""Columnar dataset files (parquet, `datasets.save_to_disk` directories) as plain rows.

A thin adapter: it lists a file's columns first, so a missing column is reported before any
data is read, then reads only the columns asked for (a verl parquet file may carry large
columns a job never uses).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class TableError(ValueError):
    """A file that cannot be opened as the kind of table asked for."""


@dataclass(frozen=True)
class Table:
    columns: list[str]
    read: Callable[[list[str]], list[dict[str, Any]]]


def open_parquet(path: Path) -> Table:
    """A parquet file, or a directory of parquet files read as one table."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    if not path.exists():
        raise TableError(f"cannot read dataset {path}: no such file or directory")
    try:
        dataset = pads.dataset(str(path), format="parquet")
        columns = list(dataset.schema.names)
    except (OSError, pa.ArrowException) as exc:
        raise TableError(f"cannot read {path} as parquet: {exc}") from None

    def read(wanted: list[str]) -> list[dict[str, Any]]:
        try:
            return dataset.to_table(columns=wanted).to_pylist()
        except (OSError, pa.ArrowException) as exc:
            raise TableError(f"cannot read {path} as parquet: {exc}") from None

    return Table(columns, read)


def open_hf_disk(path: Path, split: str) -> Table:
    """A directory written by `Dataset.save_to_disk` (or `DatasetDict.save_to_disk`)."""
    if not path.is_dir():
        raise TableError(f"cannot read dataset {path}: not a directory (kind hf-disk reads a "
                         "directory written by datasets' save_to_disk)")
    from datasets import DatasetDict, load_from_disk

    try:
        loaded = load_from_disk(str(path))
    except (OSError, ValueError) as exc:  # FileNotFoundError is an OSError
        raise TableError(f"cannot read {path} as a saved dataset: {exc}") from None
    if isinstance(loaded, DatasetDict):
        if split not in loaded:
            raise TableError(f"{path} has no split '{split}' (dataset.split); splits: "
                             f"{', '.join(sorted(loaded))}")
        loaded = loaded[split]
    dataset = loaded

    def read(wanted: list[str]) -> list[dict[str, Any]]:
        return dataset.select_columns(wanted).to_list()

    return Table(list(dataset.column_names), read)
