"""Rows of measurements, the JSON and CSV reports, and the tables printed as the run goes."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

from rich.markup import escape
from rich.table import Table

OK = "ok"


@dataclasses.dataclass
class Row:
    """One measurement: one implementation on one case of one suite.

    ``throughput`` is in ``unit`` (rows/s for the signal pass and pipeline, queries/s for k-NN);
    ``seconds`` the best time of the measured call, ``median_s`` the median of the same repeats,
    ``compile_s`` the warm-up call (compilation included) where that matters. ``ratios`` are
    speed-ups against the baselines of the same run (>1: this row is faster), ``roofline_pct``
    the share of the memory roof measured in the same run, ``quality`` the metrics the suite
    checks (AUROC, ECE, errors against an exact reference...). ``status`` is "ok", or
    "failed: ...", "not installed: ...", "not available yet: ...", "skipped: ..." with the reason.
    """

    suite: str
    case: str
    implementation: str
    sizes: dict = dataclasses.field(default_factory=dict)
    dtype: str = ""
    unit: str = ""
    throughput: float | None = None
    seconds: float | None = None
    median_s: float | None = None
    repeats: int | None = None
    compile_s: float | None = None
    ratios: dict = dataclasses.field(default_factory=dict)
    roofline_pct: float | None = None
    quality: dict = dataclasses.field(default_factory=dict)
    status: str = OK
    notes: str = ""

    @property
    def ok(self) -> bool:
        return self.status == OK

    def to_dict(self) -> dict:
        return _clean(dataclasses.asdict(self))


def _clean(value):
    """JSON has no NaN or inf: write them as null (and numpy scalars as plain numbers)."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


CSV_COLUMNS = (
    "suite", "case", "implementation", "sizes", "dtype", "unit", "throughput", "seconds",
    "median_s", "repeats", "compile_s", "ratios", "roofline_pct", "quality", "status", "notes",
)


def _kv(d: dict) -> str:
    return ";".join(f"{k}={_fmt_plain(v)}" for k, v in d.items())


def _fmt_plain(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def write_reports(report: dict, rows: list[Row], out_dir: Path, stem: str) -> tuple[Path, Path]:
    """Write ``<stem>.json`` (run, machine, packages, rows) and ``<stem>.csv`` (the rows, with the
    sizes, ratios and quality dictionaries as ``key=value;...`` cells)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{stem}.json"
    csv_path = out_dir / f"{stem}.csv"
    payload = dict(report)
    payload["rows"] = [r.to_dict() for r in rows]
    json_path.write_text(json.dumps(_clean(payload), indent=1) + "\n")
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for r in rows:
            d = r.to_dict()
            writer.writerow([
                _kv(d[c]) if isinstance(d[c], dict) else ("" if d[c] is None else _fmt_plain(d[c]))
                for c in CSV_COLUMNS
            ])
    return json_path, csv_path


def free_stem(out_dir: Path, stem: str) -> str:
    """``stem``, or ``stem-2``, ``stem-3``... so a second run on the same day keeps the first."""
    candidate, n = stem, 1
    while (out_dir / f"{candidate}.json").exists() or (out_dir / f"{candidate}.csv").exists():
        n += 1
        candidate = f"{stem}-{n}"
    return candidate


# -- printing --------------------------------------------------------------------------------------

def human(x: float | None, unit: str = "") -> str:
    """3 significant digits with k/M/G: 12345678 -> '12.3 M'."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}".rstrip()


def _sizes(d: dict) -> str:
    return " ".join(f"{k}={human(v) if isinstance(v, (int, float)) and v >= 1000 else v}".replace(" ", "") for k, v in d.items())


def _ratio_cell(d: dict) -> str:
    return " ".join(
        f"{k.removeprefix('vs ')} {v:.3g}x" for k, v in d.items() if v is not None and math.isfinite(v)
    )


def _quality_cell(d: dict) -> str:
    parts = []
    for k, v in d.items():
        if isinstance(v, float):
            parts.append(f"{k}={v:.3g}")
        elif v is not None:
            parts.append(f"{k}={v}")
    return " ".join(parts)


def suite_table(title: str, rows: list[Row], quality_keys=None, hide=()) -> Table:
    """A rich table of one suite's rows (columns that are empty for every row, or named in
    ``hide``, are left out; ``quality_keys`` picks the quality metrics shown; the JSON and CSV
    keep everything)."""
    columns = [
        ("case", lambda r: r.case),
        ("implementation", lambda r: r.implementation),
        ("sizes", lambda r: _sizes(r.sizes)),
        ("dtype", lambda r: r.dtype),
        ("throughput", lambda r: human(r.throughput, r.unit) if r.throughput is not None else ""),
        ("best s", lambda r: f"{r.seconds:.3g}" if r.seconds is not None else ""),
        ("compile s", lambda r: f"{r.compile_s:.3g}" if r.compile_s is not None else ""),
        ("speed-up vs", lambda r: _ratio_cell(r.ratios)),
        ("% roof", lambda r: f"{r.roofline_pct:.1f}" if r.roofline_pct is not None else ""),
        ("quality", lambda r: _quality_cell(
            {k: v for k, v in r.quality.items() if quality_keys is None or k in quality_keys})),
        ("status", lambda r: "" if r.ok else r.status),
    ]
    cells = [[fn(r) for _, fn in columns] for r in rows]
    keep = [
        i for i in range(len(columns))
        if columns[i][0] not in hide and (any(c[i] for c in cells) or columns[i][0] in ("case", "implementation"))
    ]
    table = Table(title=title, title_justify="left", show_lines=False, pad_edge=False)
    for i in keep:
        name = columns[i][0]
        justify = "right" if name in ("throughput", "best s", "compile s", "% roof") else "left"
        table.add_column(name, justify=justify, overflow="fold", no_wrap=name not in ("quality", "status"))
    for r, row_cells in zip(rows, cells):
        style = None if r.ok else "yellow"
        table.add_row(*[escape(row_cells[i]) for i in keep], style=style)  # "[bench]" is no markup
    return table
