"""Loaders from files on disk to `RawData` (checked afterwards by `RecData.from_raw`).

Relative paths are resolved against the current working directory. Each loader's recipe section is a small
pydantic model whose `format` field selects it (`data.source.format`).

Interactions need a user and an item; a timestamp is optional for RecBole atomic files and generic tables
(`table`): without one, each row's position in the file (0, 1, 2, ...) stands in for its time, so each user's
interactions keep the order of the file and the leave-one-out and temporal splits take the user's last rows.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pandas as pd
from pydantic import Field

from llmrec.errors import LLMRecError
from llmrec.schema import Section

from .recdata import RawData, require_columns


def existing_file(path: str | Path, key: str, what: str = "") -> Path:
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        detail = f" ({what})" if what else ""
        raise LLMRecError(f"file not found: {resolved}{detail}.", key)
    return resolved


def _open_text(path: Path, encoding: str = "utf-8") -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding=encoding)
    return open(path, encoding=encoding)


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSON Lines file; a malformed line is reported by number."""
    with _open_text(path) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise LLMRecError(f"not valid JSON ({err.msg} at column {err.colno}).", f"{path}:{number}") from None
            if not isinstance(record, dict):
                raise LLMRecError(f"expected a JSON object, found {type(record).__name__}.", f"{path}:{number}")
            yield number, record


def read_jsonl(path: Path) -> pd.DataFrame:
    """Read JSON Lines; a malformed line is reported with its line number."""
    return pd.DataFrame.from_records([record for _, record in iter_jsonl(path)])


def read_table(path: Path) -> pd.DataFrame:
    """CSV, TSV, JSON Lines or Parquet, chosen by the file's extension (a trailing .gz is allowed)."""
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    kind = suffixes[-1] if suffixes else ""
    try:
        if kind in (".jsonl", ".ndjson", ".json"):
            return read_jsonl(path)
        if kind == ".parquet":
            return pd.read_parquet(path)
        if kind in (".csv", ".tsv", ".txt"):
            return pd.read_csv(path, sep="\t" if kind == ".tsv" else ",", dtype=str, keep_default_na=False)
    except LLMRecError:
        raise
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError) as err:
        raise LLMRecError(f"could not read the file: {err}", str(path)) from None
    raise LLMRecError(
        f"unknown file type {kind or '(no extension)'!r}; use .csv, .tsv, .jsonl or .parquet.", str(path)
    )


def _rename(frame: pd.DataFrame, columns: dict[str, str], place: str, key: str) -> pd.DataFrame:
    """Rename the user's columns to llmrec's names (`columns` maps llmrec name -> file column)."""
    missing = [source for source in columns.values() if source not in frame.columns]
    if missing:
        raise LLMRecError(
            f"column {missing[0]!r} (mapped in {key}) not found; the columns are "
            f"{', '.join(map(str, frame.columns))}.",
            place,
        )
    return frame.rename(columns={source: target for target, source in columns.items()})


def apply_title_template(catalog: pd.DataFrame, template: str, place: str) -> pd.DataFrame:
    """Build `title` from other catalog columns, e.g. "{movie_title} ({release_year})"."""
    try:
        titles = [template.format_map(row) for row in catalog.fillna("").astype(str).to_dict("records")]
    except KeyError as err:
        raise LLMRecError(
            f"the title template {template!r} names column {err.args[0]!r}, which the catalog lacks; "
            f"the columns are {', '.join(map(str, catalog.columns))}.",
            place,
        ) from None
    return catalog.assign(title=[t.strip() for t in titles])


def _integers(column: pd.Series, name: str, place: str) -> pd.Series:
    values = pd.to_numeric(column, errors="coerce")
    bad = values.isna() | (values % 1 != 0)
    if bad.any():
        row = int(bad.to_numpy().nonzero()[0][0])
        raise LLMRecError(f"column {name!r} must hold integers, but row {row + 1} holds {column.iloc[row]!r}.", place)
    return values.astype(int)


class MovieLens100KSource(Section):
    """The original MovieLens-100K files: `u.data` (tab-separated) and `u.item` (pipe-separated, latin-1)."""

    format: Literal["ml-100k"]
    path: str = Field(description="Folder holding u.data and u.item.")

    def load(self, seed: int) -> RawData:
        data = existing_file(Path(self.path) / "u.data", "data.source.path", "ml-100k needs u.data and u.item")
        item = existing_file(Path(self.path) / "u.item", "data.source.path", "ml-100k needs u.data and u.item")
        inter = pd.read_csv(data, sep="\t", header=None, names=["user_id", "item_id", "rating", "timestamp"],
                            dtype=str)
        catalog = pd.read_csv(item, sep="|", header=None, encoding="latin-1", dtype=str).iloc[:, :2]
        catalog.columns = ["item_id", "title"]
        return RawData(inter, catalog, str(data), str(item), "ml-100k")


class MovieLens1MSource(Section):
    """MovieLens-1M and -10M: `ratings.dat` and `movies.dat`, fields separated by '::'."""

    format: Literal["ml-1m", "ml-10m"]
    path: str = Field(description="Folder holding ratings.dat and movies.dat.")
    encoding: str = Field("latin-1", description="ml-1m is latin-1; ml-10m is utf-8.")

    def load(self, seed: int) -> RawData:
        need = f"{self.format} needs ratings.dat and movies.dat"
        ratings = existing_file(Path(self.path) / "ratings.dat", "data.source.path", need)
        movies = existing_file(Path(self.path) / "movies.dat", "data.source.path", need)
        inter = _read_double_colon(ratings, ["user_id", "item_id", "rating", "timestamp"], self.encoding)
        catalog = _read_double_colon(movies, ["item_id", "title", "genres"], self.encoding)
        return RawData(inter, catalog, str(ratings), str(movies), self.format)


def _read_double_colon(path: Path, names: list[str], encoding: str) -> pd.DataFrame:
    rows = []
    with open(path, encoding=encoding) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            fields = line.rstrip("\n").split("::")
            if len(fields) != len(names):
                raise LLMRecError(
                    f"expected {len(names)} fields separated by '::' ({', '.join(names)}), found {len(fields)}.",
                    f"{path}:{number}",
                )
            rows.append(fields)
    return pd.DataFrame(rows, columns=names)


class RecBoleSource(Section):
    """RecBole atomic files: `<dataset>.inter` and `<dataset>.item`, tab-separated with `name:type` headers."""

    format: Literal["recbole"]
    path: str = Field(description="Folder holding <dataset>.inter and <dataset>.item.")
    dataset: str | None = Field(None, description="File stem (default: the folder's name).")
    title_template: str | None = Field(
        None, description="How to build titles from item columns (default: '{movie_title} ({release_year})' when "
        "both exist, else the first of movie_title, title, name)."
    )

    def load(self, seed: int) -> RawData:
        folder = Path(self.path)
        stem = self.dataset or folder.expanduser().resolve().name
        inter_path = existing_file(folder / f"{stem}.inter", "data.source.path", "RecBole atomic interactions")
        item_path = existing_file(folder / f"{stem}.item", "data.source.path", "RecBole atomic item features")
        inter = _read_atomic(inter_path)
        catalog = _read_atomic(item_path)
        require_columns(inter, ["user_id", "item_id"], str(inter_path))
        if "timestamp" not in inter.columns:
            inter["timestamp"] = range(len(inter))  # file order stands in for time
        catalog = apply_title_template(catalog, self._template(catalog, str(item_path)),
                                       f"{item_path} (title_template)")
        return RawData(inter, catalog, str(inter_path), str(item_path), stem)

    def _template(self, catalog: pd.DataFrame, place: str) -> str:
        if self.title_template:
            return self.title_template
        if {"movie_title", "release_year"} <= set(catalog.columns):
            return "{movie_title} ({release_year})"
        for column in ("movie_title", "title", "name"):
            if column in catalog.columns:
                return "{" + column + "}"
        raise LLMRecError(
            "no title column (movie_title, title or name) found; set data.source.title_template.", place
        )


def _read_atomic(path: Path) -> pd.DataFrame:
    frame = _read_tsv(path)
    frame.columns = [str(c).split(":", 1)[0] for c in frame.columns]
    return frame


def _read_tsv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=3)
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise LLMRecError(f"could not read the tab-separated file: {err}", str(path)) from None


class AmazonSource(Section):
    """Amazon-Reviews-2023-style JSON Lines: reviews (`user_id`, `parent_asin`, `rating`, `timestamp`) and item
    metadata (`parent_asin`, `title`)."""

    format: Literal["amazon"]
    reviews: str = Field(description="Reviews file (.jsonl or .jsonl.gz).")
    meta: str = Field(description="Item metadata file (.jsonl or .jsonl.gz).")
    item_key: str = Field("parent_asin", description="The field that identifies an item in both files.")

    def load(self, seed: int) -> RawData:
        reviews_path = existing_file(self.reviews, "data.source.reviews")
        meta_path = existing_file(self.meta, "data.source.meta")
        reviews = read_jsonl(reviews_path)
        meta = read_jsonl(meta_path)
        require_columns(reviews, ["user_id", self.item_key, "timestamp"], str(reviews_path),
                        " (data.source.item_key names the item field)")
        require_columns(meta, [self.item_key, "title"], str(meta_path))
        inter = reviews.rename(columns={self.item_key: "item_id"})
        keep = [c for c in ("user_id", "item_id", "rating", "timestamp") if c in inter.columns]
        catalog = meta.rename(columns={self.item_key: "item_id"})
        catalog = catalog[[c for c in catalog.columns if c in ("item_id", "title", "main_category", "store")]]
        return RawData(inter[keep], catalog, str(reviews_path), str(meta_path), reviews_path.name.split(".")[0])


class TableSource(Section):
    """Generic CSV / TSV / JSON Lines / Parquet files with a column mapping; the timestamp column is optional (without
    it, each user's interactions keep the order of the file)."""

    format: Literal["table"]
    interactions: str = Field(description="Interactions file.")
    catalog: str = Field(description="Catalog file.")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="llmrec name -> column in the interactions file, for user_id, item_id, timestamp, rating, "
                    "environment (e.g. {user_id: userId}). user_id and item_id are required; without a timestamp, "
                    "each user's interactions keep the order of the file.",
    )
    catalog_columns: dict[str, str] = Field(
        default_factory=dict, description="llmrec name -> column in the catalog file, for item_id and title."
    )
    title_template: str | None = Field(
        None, description="Build titles from catalog columns instead of a title column."
    )

    def load(self, seed: int) -> RawData:
        inter_path = existing_file(self.interactions, "data.source.interactions")
        catalog_path = existing_file(self.catalog, "data.source.catalog")
        inter = _rename(read_table(inter_path), self.columns, str(inter_path), "data.source.columns")
        catalog = _rename(read_table(catalog_path), self.catalog_columns, str(catalog_path),
                          "data.source.catalog_columns")
        hint = " Map your column names with data.source.columns (llmrec name -> file column, e.g. {user_id: userId})."
        require_columns(inter, ["user_id", "item_id"], str(inter_path), hint)
        if "timestamp" not in inter.columns:
            inter["timestamp"] = range(len(inter))  # file order stands in for time
        if "environment" in inter.columns:  # text in CSV / TSV; the shifts and CausalDPO compare integers
            inter["environment"] = _integers(inter["environment"], "environment", str(inter_path))
        if self.title_template:
            catalog = apply_title_template(catalog, self.title_template, "data.source.title_template")
        require_columns(catalog, ["item_id", "title"], str(catalog_path),
                        " Map them with data.source.catalog_columns.")
        return RawData(inter, catalog, str(inter_path), str(catalog_path), inter_path.name.split(".")[0])
