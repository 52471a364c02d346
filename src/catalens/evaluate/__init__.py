"""catalens.evaluate: metrics, F1-tuned tag thresholds, figures and the HTML report.

``compute_metrics`` and ``tune_thresholds`` need only numpy and are imported at once;
the report and plot functions load matplotlib, so they are imported on first use.
"""
from __future__ import annotations

from catalens.evaluate.metrics import compute_metrics
from catalens.evaluate.thresholds import tune_thresholds

_LAZY = {
    "write_report": "catalens.evaluate.report",
    "confusion_matrix_png": "catalens.evaluate.plots",
    "pr_curves_png": "catalens.evaluate.plots",
    "calibration_png": "catalens.evaluate.plots",
    "class_counts_png": "catalens.evaluate.plots",
}

__all__ = ["compute_metrics", "tune_thresholds", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'catalens.evaluate' has no attribute '{name}'")
