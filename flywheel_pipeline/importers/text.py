"""Delimited text files as the logs teams keep them: a separator of one or more characters, with or
without a header line.

polars reads a one-character separator (``,``, ``\\t``) itself; a longer one (MovieLens-1M's
``::``) splits each line, and a column whose every value is a number is then read as one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import polars as pl


def read_delimited(path: Path, separator: str, header: bool, names: Sequence[str] | None = None,
                   columns: Sequence[str] | None = None, n_rows: int | None = None,
                   text_columns: Sequence[str] = (), encoding: str = "utf8") -> pl.DataFrame:
    """The file's rows: named by its header line, or by ``names`` (a file without one); only
    ``columns`` when given; ``text_columns`` as strings, the rest typed as read."""
    if len(separator) == 1:
        frame = pl.read_csv(path, separator=separator, has_header=header, new_columns=list(names) if names else None,
                            columns=list(columns) if columns and header else None, n_rows=n_rows,
                            schema_overrides={c: pl.String for c in text_columns}, infer_schema_length=100_000,
                            encoding=encoding)
        return frame.select(columns) if columns else frame
    lines = _lines(path, None if n_rows is None else n_rows + int(header), encoding)
    fields = list(lines["line"][0].split(separator) if header and lines.height else names or [])
    frame = (lines.slice(int(header))
             .select(pl.col("line").str.split(separator).list.to_struct(fields=fields)).unnest("line"))
    frame = frame.select(columns) if columns else frame
    numeric = [c for c in frame.columns if c not in text_columns and _all_numbers(frame[c])]
    return frame.with_columns(pl.col(numeric).str.strip_chars().cast(pl.Float64)) if numeric else frame


def first_row_width(path: Path, separator: str) -> int:
    """How many fields the file's first line holds."""
    if len(separator) == 1:
        return pl.read_csv(path, separator=separator, has_header=False, n_rows=1).width
    lines = _lines(path, 1, "utf8-lossy")
    return len(lines["line"][0].split(separator)) if lines.height else 0


def _lines(path: Path, n_rows: int | None, encoding: str) -> pl.DataFrame:
    """The file's lines as they are, one column ``line``."""
    return pl.read_csv(path, has_header=False, separator="\x00", quote_char=None, new_columns=["line"],
                       schema_overrides={"line": pl.String}, n_rows=n_rows, encoding=encoding)


def _all_numbers(values: pl.Series) -> bool:
    present = values.drop_nulls().str.strip_chars()
    return present.len() > 0 and present.cast(pl.Float64, strict=False).null_count() == 0
