"""`rlhfless report`: one self-contained HTML page, checked as text and in a real browser.

The rows are built like the driver's: cost keys from `rlhfless.cost.cost_metrics` over
instance lifetimes and requests, plus reward, length, scheduling keys and the timeline.
(`test_run_budget.py` writes a report from a real run's metrics too.)
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from browser import chromium_or_skip, chromium_page
from typer.testing import CliRunner

from rlhfless.api.spec import CostSpec, GpuPrice
from rlhfless.cli import app
from rlhfless.cost import cost_metrics, stage_prices
from rlhfless.report import render, write_report
from rlhfless.scheduling.cost import Lifetime

runner = CliRunner()
SECTIONS = ("Reward and response length", "Cost per stage", "Where the GPU-seconds go",
            "Instance timeline", "Scheduling decisions and prediction error",
            "Serverless vs serverful")


def synthetic_rows(steps: int = 4, priced: bool = True) -> list[dict[str, Any]]:
    rows = []
    stages = ["actor", "reference", "reward", "trainer"]
    prices = stage_prices(CostSpec(gpu_type="H100" if priced else "unpriced-gpu",
                                   prices={"H100": GpuPrice(on_demand=3.6)}), stages)
    for step in range(1, steps + 1):
        n = 1 + step % 2
        t0 = 100.0 * step
        lives = {
            "actor": [Lifetime(t0, t0 + 8 + i, 1, 2.0 if step == 1 else 0.0)
                      for i in range(n)],
            "reference": [Lifetime(t0 + 6, t0 + 12, 1, 1.0)],
            "reward": [Lifetime(t0 + 6, t0 + 11, 0, 0.5)],
            "trainer": [Lifetime(t0 + 7, None, 2, 1.5)],
        }
        requests = {"actor": [(t0 + 0.5, t0 + 6.0 + i) for i in range(n)],
                    "reference": [(t0 + 8.0, t0 + 9.0)], "reward": [(t0 + 8.0, t0 + 8.5)],
                    "trainer": [(t0 + 9.0, t0 + 14.0)]}
        samples = [(t0 + 1.0 + k * 0.6, 4 + k) for k in range(8)]
        row: dict[str, Any] = {
            "step": step, "weights_version": step, "timing_s/step": 15.0,
            "reward/mean": 0.1 * step, "reward/std": 0.05, "reward/max": 0.2 * step,
            "response_length/mean": 20.0 - step, "response_length/max": 32.0,
            "sched/actors": float(n), "sched/warm_actors": float(step > 1),
            "sched/pred_mae_tokens": 8.0 / step,
            "sched/pred_spearman": 0.2 * step,
            **{f"sched/table/n{k}/{what}": value
               for k in (1, 2) for what, value in (("time_s", 10.0 / k),
                                                   ("gpu_seconds", 12.0 * k),
                                                   ("score", 1.0 + (k == n) * -0.2))},
            **cost_metrics(lives, requests, t0, t0 + 15.0, prices, ["actor"], samples),
        }
        row["cost/gpu_seconds"] = sum(row[f"cost/split/{u}"] for u in (
            "busy", "cold_start", "prewarm_wait", "keep_alive_idle"))
        for stage in stages:
            row[f"cost/gpu_seconds/{stage}"] = sum(
                v for k, v in row.items() if k.startswith("cost/split/") and k.endswith(
                    f"/{stage}"))
        row["timeline"] = [
            {"stage": stage, "instance": f"{stage}-{i}", "start": life.start - t0,
             "end": (life.end or t0 + 15.0) - t0, "cold_start": life.cold_start_s}
            for stage, ls in lives.items() for i, life in enumerate(ls)]
        row["requests"] = [{"stage": stage, "start": a - t0, "end": b - t0}
                           for stage, ivs in requests.items() for a, b in ivs]
        rows.append(row)
    return rows


def run_dir_with(tmp_path: Path, rows: list[dict[str, Any]], name: str = "demo-run") -> Path:
    run_dir = tmp_path / name
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


def test_report_needs_a_run_with_metrics(tmp_path: Path) -> None:
    cases = {tmp_path / "absent": "no such run directory"}
    empty = tmp_path / "empty"
    empty.mkdir()
    cases[empty] = "no metrics.jsonl"
    blank = run_dir_with(tmp_path, [], "blank")
    cases[blank] = "no step recorded yet"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metrics.jsonl").write_text("{not json\n")
    cases[broken] = "not a metrics log"
    for run_dir, why in cases.items():
        result = runner.invoke(app, ["report", str(run_dir)])
        out = " ".join(result.output.split())
        assert result.exit_code == 2, out
        assert why in out and "Traceback" not in out, out
        assert not (run_dir / "report.html").exists()


def test_report_page_is_self_contained_and_complete(tmp_path: Path) -> None:
    run_dir = run_dir_with(tmp_path, synthetic_rows())
    result = runner.invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    page = (run_dir / "report.html").read_text()
    for section in SECTIONS:
        assert f"<h2>{section}</h2>" in page, section
    assert page.count("<svg") == 6 and "<img" not in page
    # Nothing to fetch: no scripts, no external style sheets, fonts or images.
    assert "<script" not in page and "<link" not in page and "@import" not in page
    assert not re.findall(r'(?:src|href)="(?!#)[^"]*"', page)
    assert "url(http" not in page and "@font-face" not in page
    # Figures' ids are prefixed per figure, so none clashes with another.
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert ids and len(ids) == len(set(ids))
    # The last step's T/C table with its chosen N highlighted (step 4 chose N = 1).
    chosen = re.search(r'<tr class="chosen"><td>(\d+)</td>', page)
    assert chosen is not None and chosen.group(1) == "1"
    assert "busy" in page and "serverful" in page and "$" in page


def test_report_without_prices_says_dollars_are_missing(tmp_path: Path) -> None:
    page = render(synthetic_rows(priced=False), "unpriced")
    assert "Dollars are missing for a GPU type without a price" in page
    assert page.count("<svg") == 6


def test_report_renders_in_a_real_browser(tmp_path: Path) -> None:
    """Headless Chromium loads the page with no console error, requests nothing but the
    file itself, and draws every figure at a real size; a screenshot is kept in tmp."""
    binary = chromium_or_skip()
    report = write_report(run_dir_with(tmp_path, synthetic_rows()))
    url = report.resolve().as_uri()
    with chromium_page(binary) as page:
        page.open(url)
        sizes = page.evaluate(
            "Array.from(document.querySelectorAll('svg, img')).map(e => {"
            " const r = e.getBoundingClientRect();"
            " return [e.getAttribute('aria-label'), r.width, r.height]; })")
        headings = page.evaluate(
            "Array.from(document.querySelectorAll('h2')).map(h => h.textContent)")
        shot = page.screenshot(tmp_path / "report.png")
        log = page.log
    assert log.console_errors == [] and log.exceptions == [], log
    assert log.requests == [url], log.requests
    assert len(sizes) == 6
    for label, width, height in sizes:
        assert label and width > 300 and height > 100, (label, width, height)
    assert headings == list(SECTIONS)
    assert shot.stat().st_size > 50_000  # a page of plots, not a blank one
