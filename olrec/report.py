"""Reports of a progressive run: a JSON of every figure, a PNG of windowed AUC
(online vs frozen), and a short table for the terminal."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Mapping

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .metrics import Summary
from .progressive import RunResult

__all__ = ["write_report", "report_dict", "format_summary"]


def _num(x: Any) -> Any:
    """JSON-safe: NaN/inf become null, numpy scalars plain numbers."""
    if x is None:
        return None
    if hasattr(x, "item"):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _summary(s: Summary | None) -> dict[str, Any] | None:
    if s is None:
        return None
    return {"n": s.n, "auc": _num(s.auc), "logloss": _num(s.logloss), "calibration": _num(s.calibration),
            "mean_pred": _num(s.mean_pred), "rate": _num(s.rate)}


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def report_dict(result: RunResult, *, name: str, config_dict: Mapping[str, Any] | None = None,
                window: int, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Every figure of the run as a JSON-ready dict (NaN is ``null``)."""
    overall = _summary(result.overall())
    online, frozen = result.after_split()
    on, fr = _summary(online), _summary(frozen)
    stats = [dataclasses.asdict(s) for s in result.stats]
    totals = {k: int(sum(s[k] for s in stats)) for k in ("rows", "bytes", "admissions", "evictions")}
    auc_on = on["auc"] if on else None
    auc_fr = fr["auc"] if fr else None
    out: dict[str, Any] = {
        "name": name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "events": int(len(result.label)),
        "events_per_s": _num(result.events_per_s),
        "learn_seconds": _num(result.learn_seconds),
        "auc": overall["auc"],
        "logloss": overall["logloss"],
        "calibration": overall["calibration"],
        "overall": overall,
        "split": int(result.split),
        "auc_online_after_split": auc_on,
        "auc_frozen_after_split": auc_fr,
        "auc_online_minus_frozen": _diff(auc_on, auc_fr),
        "logloss_online_after_split": on["logloss"] if on else None,
        "logloss_frozen_after_split": fr["logloss"] if fr else None,
        "after_split": {"online": on, "frozen": fr},
        "window": int(window),
        "windows": [{k: _num(v) for k, v in w.items()} for w in result.windows(window)],
        "tables": [{k: _num(v) for k, v in s.items()} for s in stats],
        "table_totals": totals,
    }
    if extra:
        out.update(extra)
    out["config"] = dict(config_dict or {})
    return out


def write_report(result: RunResult, out_dir: str | Path, *, name: str, config_dict: Mapping[str, Any] | None = None,
                 window: int, extra: Mapping[str, Any] | None = None) -> tuple[Path, Path]:
    """Write ``out_dir/<name>.json`` and ``out_dir/<name>.png``; return their paths.

    ``extra`` adds top-level keys to the JSON (the CLI adds its dead-letter count).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rep = report_dict(result, name=name, config_dict=config_dict, window=window, extra=extra)
    json_path, png_path = out / f"{name}.json", out / f"{name}.png"
    json_path.write_text(json.dumps(rep, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    _plot(rep, png_path)
    return json_path, png_path


def _plot(rep: Mapping[str, Any], path: Path) -> None:
    fig = Figure(figsize=(8, 4.5), dpi=110)
    FigureCanvasAgg(fig)  # no pyplot: no global backend, no state shared between reports
    ax = fig.add_subplot(1, 1, 1)
    wins = rep["windows"]
    x = [w["end"] for w in wins]
    online = [math.nan if w["auc"] is None else w["auc"] for w in wins]
    ax.plot(x, online, marker="o", ms=3, label="online (learns every event)")
    fx = [w["end"] for w in wins if w["auc_frozen"] is not None]
    if fx:
        ax.plot(fx, [w["auc_frozen"] for w in wins if w["auc_frozen"] is not None],
                marker="s", ms=3, label="frozen at the split (learns nothing)")
    if 0 < rep["split"] < rep["events"]:
        ax.axvline(rep["split"], color="grey", ls="--", lw=1, label=f"split (event {rep['split']:,})")
    ax.set_xlabel("events (end of window)")
    ax.set_ylabel(f"AUC per window of {rep['window']:,} events")
    diff = rep["auc_online_minus_frozen"]
    sub = f"; online - frozen after split: {diff:+.4f}" if diff is not None else ""
    ax.set_title(f"{rep['name']}: progressive AUC{sub}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")


def _f(x: float | None, fmt: str = ".4f") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def format_summary(result: RunResult) -> str:
    """A short table for the terminal."""
    overall = result.overall()
    online, frozen = result.after_split()
    n_after = len(result.label) - result.split
    rows = [("overall", overall)]
    if n_after > 0 and result.split > 0:
        rows.append((f"online, last {n_after:,}", online))
        if frozen is not None:
            rows.append((f"frozen, last {n_after:,}", frozen))
    width = max(len(r[0]) for r in rows)
    lines = [f"{len(result.label):,} events in {result.learn_seconds:.2f} s of learning "
             f"({_f(result.events_per_s, ',.0f')} events/s)",
             f"{'':<{width}}  {'AUC':>7}  {'logloss':>7}  {'calib':>6}"]
    for label, s in rows:
        lines.append(f"{label:<{width}}  {_f(s.auc):>7}  {_f(s.logloss):>7}  {_f(s.calibration, '.3f'):>6}")
    if frozen is not None:
        lines.append(f"{'online - frozen AUC':<{width}}  {_f(online.auc - frozen.auc, '+.4f'):>7}")
    stats = result.stats
    if stats:
        rows_n = sum(s.rows for s in stats)
        mib = sum(s.bytes for s in stats) / 2**20
        lines.append(f"tables: {len(stats)}, {rows_n:,} rows, {mib:.1f} MiB, "
                     f"{sum(s.admissions for s in stats):,} admissions, {sum(s.evictions for s in stats):,} evictions")
    return "\n".join(lines)
