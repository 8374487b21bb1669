"""Columnar readers for JSON lines and CSV, with a line-by-line pass that names the bad line.

The fast path streams the file through pyarrow's block readers (multi-threaded, only the wanted
columns are kept, compressed input is decompressed block by block). When it fails, or a required
field is missing, the slow path re-reads the file line by line: it either points at the first bad
line (`on_bad_line="error"`) or skips and counts bad lines (`"skip"`).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.json as pj

from data_prep.errors import DataError

BLOCK_SIZE = 16 << 20
SLOW_CHUNK_ROWS = 200_000
MAX_EXAMPLES = 5


class BadValue(ValueError):
    """A field's value is missing or of the wrong type; the message says what was expected."""


@dataclass(frozen=True)
class Field:
    """One wanted field: its name in the source, its column name, arrow type and slow-path converter."""

    source: str
    column: str
    type: pa.DataType
    convert: Callable[[Any], Any]
    required: bool = True


@dataclass
class ReadReport:
    rows: int = 0
    bad_lines_skipped: int = 0
    bad_line_examples: list[str] | None = None
    slow_path: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "bad_lines_skipped": self.bad_lines_skipped,
            "bad_line_examples": self.bad_line_examples or [],
            "slow_path": self.slow_path,
        }


# ---- slow-path converters: value from json/csv -> python value, or BadValue ----


def to_str(value: Any) -> str:
    if isinstance(value, str) and value != "":
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise BadValue(f"expected a non-empty string, got {value!r}")


def to_opt_str(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise BadValue(f"expected a string, got {type(value).__name__}")


def to_float(value: Any) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise BadValue(f"expected a number, got {value!r}") from None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    raise BadValue(f"expected a number, got {value!r}")


def to_opt_float(value: Any) -> float | None:
    return None if value is None else to_float(value)


def to_int(value: Any) -> int:
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            raise BadValue(f"expected an integer, got {value!r}") from None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise BadValue(f"expected an integer, got {value!r}")


def to_opt_int(value: Any) -> int | None:
    return None if value is None else to_int(value)


def to_str_list(value: Any) -> list[str]:
    """Strings, or lists of them (2014 metadata nests category lists), flattened."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        out: list[str] = []
        for v in value:
            out.extend(to_str_list(v))
        return out
    raise BadValue(f"expected a list of strings, got {type(value).__name__}")


# ---- opening files ----


def open_text(path: Path) -> io.TextIOBase:
    raw = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")  # noqa: SIM115
    return io.TextIOWrapper(raw, encoding="utf-8", errors="strict", newline="")


def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise DataError(str(path), None, None, "file not found")


def _bad_line(path: Path, line: int, field: str | None, problem: str, mode: str, report: ReadReport) -> None:
    if mode == "error":
        raise DataError(str(path), line, field, problem)
    report.bad_lines_skipped += 1
    if len(report.bad_line_examples) < MAX_EXAMPLES:
        report.bad_line_examples.append(str(DataError(str(path), line, field, problem)))


def _missing_required(table: pa.Table, fields: list[Field]) -> bool:
    for f in fields:
        if not f.required:
            continue
        col = table.column(f.column)
        if col.null_count:
            return True
        if pa.types.is_string(f.type) and pc.any(pc.equal(col, "")).as_py():
            return True
    return False


def _rows_to_table(rows: dict[str, list], fields: list[Field]) -> pa.Table:
    return pa.table({f.column: pa.array(rows[f.column], type=f.type) for f in fields})


def _slow_read(
    path: Path, fields: list[Field], mode: str, lines: Iterator[tuple[int, dict | None, str | None]]
) -> tuple[pa.Table, ReadReport]:
    """Collect converted rows from (line number, record or None, parse problem) triples."""
    report = ReadReport(bad_line_examples=[], slow_path=True)
    rows: dict[str, list] = {f.column: [] for f in fields}
    chunks: list[pa.Table] = []
    try:
        for lineno, record, problem in lines:
            if record is None:
                _bad_line(path, lineno, None, problem or "unreadable line", mode, report)
                continue
            converted = {}
            for f in fields:
                value = record.get(f.source)
                if value is None and f.required:
                    _bad_line(path, lineno, f.source, "missing", mode, report)
                    break
                try:
                    converted[f.column] = f.convert(value)
                except BadValue as err:
                    _bad_line(path, lineno, f.source, str(err), mode, report)
                    break
            else:
                for column, value in converted.items():
                    rows[column].append(value)
                if len(rows[fields[0].column]) >= SLOW_CHUNK_ROWS:
                    chunks.append(_rows_to_table(rows, fields))
                    rows = {f.column: [] for f in fields}
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as err:
        raise DataError(str(path), None, None, f"cannot read the file to the end ({err})") from err
    chunks.append(_rows_to_table(rows, fields))
    table = pa.concat_tables(chunks)
    report.rows = table.num_rows
    return table, report


# ---- JSON lines ----


def _json_records(path: Path) -> Iterator[tuple[int, dict | None, str | None]]:
    with open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                yield lineno, None, f"broken JSON ({err.msg} at column {err.colno})"
                continue
            if not isinstance(record, dict):
                yield lineno, None, f"expected a JSON object, got {type(record).__name__}"
                continue
            yield lineno, record, None


def _fast_json(path: Path, fields: list[Field]) -> pa.Table:
    schema = pa.schema([(f.source, f.type) for f in fields])
    reader = pj.open_json(
        str(path),
        read_options=pj.ReadOptions(block_size=BLOCK_SIZE),
        parse_options=pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore"),
    )
    table = pa.Table.from_batches(list(reader), schema=schema)
    return table.rename_columns([f.column for f in fields])


def read_jsonl(
    path: str | Path, fields: list[Field], on_bad_line: str = "error"
) -> tuple[pa.Table, ReadReport]:
    """Read `fields` from a JSON-lines file (optionally .gz) into a table with one column per field."""
    path = Path(path)
    _check_exists(path)
    try:
        table = _fast_json(path, fields)
        if not _missing_required(table, fields):
            return table, ReadReport(rows=table.num_rows, bad_line_examples=[])
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError):
        pass
    return _slow_read(path, fields, on_bad_line, _json_records(path))


# ---- CSV ----


def _csv_records(
    path: Path, names: list[str] | None, delimiter: str
) -> Iterator[tuple[int, dict | None, str | None]]:
    with open_text(path) as fh:
        reader = csv.reader(
            fh, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        )
        header = names
        for row in reader:
            if header is None:
                header = row
                continue
            if not row:
                continue
            if len(row) != len(header):
                yield reader.line_num, None, f"expected {len(header)} fields, got {len(row)}"
                continue
            yield (
                reader.line_num,
                {k: (v if v != "" else None) for k, v in zip(header, row, strict=True)},
                None,
            )


def _fast_csv(path: Path, fields: list[Field], names: list[str] | None, delimiter: str) -> pa.Table:
    reader = pcsv.open_csv(
        str(path),
        read_options=pcsv.ReadOptions(block_size=BLOCK_SIZE, column_names=names),
        parse_options=pcsv.ParseOptions(delimiter=delimiter, quote_char=False if delimiter == "\t" else '"'),
        convert_options=pcsv.ConvertOptions(
            column_types={f.source: f.type for f in fields},
            include_columns=[f.source for f in fields],
            strings_can_be_null=True,
        ),
    )
    table = reader.read_all()
    return table.select([f.source for f in fields]).rename_columns([f.column for f in fields])


def read_csv(
    path: str | Path,
    fields: list[Field],
    on_bad_line: str = "error",
    names: list[str] | None = None,
    delimiter: str = ",",
) -> tuple[pa.Table, ReadReport]:
    """Read `fields` from a CSV file (header row unless `names` is given; optionally .gz)."""
    path = Path(path)
    _check_exists(path)
    try:
        table = _fast_csv(path, fields, names, delimiter)
        if not _missing_required(table, fields):
            return table, ReadReport(rows=table.num_rows, bad_line_examples=[])
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError, KeyError):
        pass
    return _slow_read(path, fields, on_bad_line, _csv_records(path, names, delimiter))
