"""The run report: one self-contained HTML page from a run directory's metrics."""

from rlhfless.report.page import REPORT_FILE, ReportError, render, write_report

__all__ = ["REPORT_FILE", "ReportError", "render", "write_report"]
