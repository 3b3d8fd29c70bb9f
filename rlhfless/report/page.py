"""`rlhfless report RUN_DIR`: one self-contained report.html from a run's metrics.jsonl.

Self-contained means it loads nothing: no scripts, no fonts, no stylesheets from elsewhere;
figures are inline SVG (rlhfless.report.figures), the style sheet is inline, tables are HTML.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rlhfless.cost import USES, Ledger
from rlhfless.driver.records import MetricsLog
from rlhfless.report import figures

Row = dict[str, Any]
REPORT_FILE = "report.html"


class ReportError(Exception):
    """The run directory has nothing to report (the message says what is missing)."""


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto;
       max-width: 1100px; padding: 1.5rem; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2rem; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #ddd; }
.meta { color: #666; margin-top: 0; }
.cards { display: flex; flex-wrap: wrap; gap: 0.8rem; margin: 1rem 0; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 0.6rem 0.9rem; min-width: 9rem; }
.card b { display: block; font-size: 1.3rem; }
figure { margin: 1rem 0; } figure svg { width: 100%; height: auto; display: block; }
figcaption { color: #555; font-size: 0.9rem; }
table { border-collapse: collapse; margin: 0.8rem 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.6rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
tr.chosen { background: #e8f0fb; font-weight: 600; }
.note { color: #666; font-size: 0.9rem; }
"""


def _num(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    value = float(value)
    return f"{value:,.{digits}f}" if abs(value) >= 0.01 or value == 0 else f"{value:.2g}"


def _usd(value: float | None) -> str:
    return "–" if value is None else f"${_num(value, 4 if abs(value) < 1 else 2)}"


def _table(header: Sequence[str], body: Sequence[Sequence[str]],
           chosen: int | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = []
    for i, cells in enumerate(body):
        cls = ' class="chosen"' if i == chosen else ""
        rows.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells)
                    + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _figure(svg: str | None, caption: str, missing: str) -> str:
    if svg is None:
        return f'<p class="note">{html.escape(missing)}</p>'
    return f"<figure>{svg}<figcaption>{html.escape(caption)}</figcaption></figure>"


def _stage_table(rows: Sequence[Row], ledger: Ledger) -> str:
    split: dict[str, dict[str, float]] = {}
    for row in rows:
        for use in USES:
            for key, value in row.items():
                if key.startswith(f"cost/split/{use}/"):
                    stage = key.rsplit("/", 1)[1]
                    split.setdefault(stage, dict.fromkeys(USES, 0.0))[use] += float(value)
    serverful: dict[str, float] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith("cost/serverful/gpu_seconds/"):
                stage = key.rsplit("/", 1)[1]
                serverful[stage] = serverful.get(stage, 0.0) + float(value)
    body = []
    for stage, gpu_s in ledger.stage_gpu_seconds.items():
        uses = split.get(stage, {})
        body.append([stage, _num(gpu_s), _usd(ledger.stage_dollars.get(stage)),
                     *(_num(uses.get(u)) for u in USES), _num(serverful.get(stage))])
    body.append(["all", _num(ledger.gpu_seconds), _usd(ledger.dollars),
                 *(_num(sum(s.get(u, 0.0) for s in split.values())) if split else "–"
                   for u in USES), _num(ledger.serverful_gpu_seconds)])
    return _table(["stage", "GPU-seconds", "dollars", *(u.replace("_", " ") for u in USES),
                   "serverful GPU-s"], body)


def _sched_table(row: Row) -> str | None:
    entries: dict[int, dict[str, float]] = {}
    for key, value in row.items():
        match = re.fullmatch(r"sched/table/n(\d+)/(\w+)", key)
        if match:
            entries.setdefault(int(match.group(1)), {})[match.group(2)] = float(value)
    if not entries:
        return None
    ns = sorted(entries)
    chosen = int(row.get("sched/actors", -1))
    body = [[str(n), _num(entries[n].get("time_s")), _num(entries[n].get("gpu_seconds")),
             _num(entries[n].get("score"), 3)] for n in ns]
    return _table(["N actors", "predicted T (s)", "predicted C (GPU-s)", "score"], body,
                  chosen=ns.index(chosen) if chosen in ns else None)


def _scheduling_section(rows: Sequence[Row]) -> str:
    parts = [_figure(figures.scheduling(rows), "N chosen by the cost-aware policy (λ·T/T_ref + "
                     "(1−λ)·C/C_ref) and the error of the response-length prediction.",
                     "No scheduling decisions were recorded.")]
    tables = [(int(r["step"]), t) for r in rows if (t := _sched_table(r)) is not None]
    if tables:
        step, last = tables[-1]
        parts.append(f"<p>The T/C table of step {step} (the chosen N highlighted):</p>{last}")
        earlier = "".join(f"<h4>step {s}</h4>{t}" for s, t in tables[:-1])
        if earlier:
            parts.append(f"<details><summary>Every step's table</summary>{earlier}</details>")
    else:
        parts.append('<p class="note">The actor count was fixed (scheduling.costAware off): '
                     "no T/C table.</p>")
    return "".join(parts)


def render(rows: Sequence[Row], title: str) -> str:
    """The report page for these metrics rows."""
    ledger = Ledger.of(rows)
    first, last = rows[0], rows[-1]
    saving = (1 - ledger.gpu_seconds / ledger.serverful_gpu_seconds
              if ledger.serverful_gpu_seconds > 0 else None)
    cards = [
        ("steps", str(len(rows))),
        ("reward", f"{_num(first.get('reward/mean'), 3)} → "
                   f"{_num(last.get('reward/mean'), 3)}"),
        ("GPU-seconds", _num(ledger.gpu_seconds, 1)),
        ("dollars", _usd(ledger.dollars)),
        ("serverful GPU-s", _num(ledger.serverful_gpu_seconds, 1)),
        ("saving", "–" if saving is None else f"{saving:.0%}"),
    ]
    card_html = "".join(f'<div class="card">{html.escape(k)}<b>{html.escape(v)}</b></div>'
                        for k, v in cards)
    no_dollars = ("" if ledger.dollars is not None else
                  '<p class="note">Dollars are missing for a GPU type without a price; '
                  "GPU-seconds are complete (see spec.cost.prices).</p>")
    created = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    sections = [
        ("Reward and response length", _figure(
            figures.reward_and_length(rows), "Mean reward (± std, max) and response lengths "
            "per step.", "")),
        ("Cost per stage", _figure(
            figures.cost_per_stage(rows), "GPU-seconds billed (GPUs × seconds alive, cold "
            "start and keep-alive included) and dollars per stage and step.", "")
         + no_dollars + _stage_table(rows, ledger)),
        ("Where the GPU-seconds go", _figure(
            figures.split(rows), "Busy (serving), cold start (loading), prewarm wait (ready "
            "before its work) and keep-alive idle (ready with nothing to do).",
            "This run predates the GPU-second split.")),
        ("Instance timeline", _figure(
            figures.timeline(rows), "Each function instance's life (its stage's colour, "
            "dark while cold-starting) and each stage's requests in flight (hatched).",
            "No instance timeline was recorded.")),
        ("Scheduling decisions and prediction error", _scheduling_section(rows)),
        ("Serverless vs serverful", _figure(
            figures.serverful(rows), "Billed GPU-seconds against a serverful layout on the "
            "same measured timings (every stage's peak GPUs held for the whole step), the "
            "saving, and the share of each rollout spent in its tail (fewer than half of "
            "the samples still running).", "This run predates the serverful comparison.")),
    ]
    body = "".join(f"<section><h2>{html.escape(h)}</h2>{content}</section>"
                   for h, content in sections)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)} · RLHFless run report</title><style>{_CSS}</style>"
            f"</head><body><h1>{html.escape(title)}</h1>"
            f'<p class="meta">RLHFless run report · steps {first["step"]}–{last["step"]} · '
            f"written {created}</p><div class=\"cards\">{card_html}</div>{body}</body></html>\n")


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write the report of a run directory; ReportError when it has no recorded step."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such run directory")
    log = MetricsLog(run_dir / "metrics.jsonl")
    if not log.path.exists():
        raise ReportError(f"{run_dir}: no metrics.jsonl (not a run directory, or no step "
                          "has finished yet)")
    try:
        rows = log.read()
    except ValueError as exc:
        raise ReportError(f"{log.path}: not a metrics log ({exc})") from None
    if not rows:
        raise ReportError(f"{log.path}: no step recorded yet")
    out = Path(out) if out is not None else run_dir / REPORT_FILE
    out.write_text(render(rows, run_dir.resolve().name), encoding="utf-8")
    return out
