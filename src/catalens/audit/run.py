"""``catalens audit DATA``: open the data, audit it, rank likely label errors, write the report.

Apart from :mod:`catalens.audit.core` (the findings) and :mod:`catalens.audit.report` (the HTML
and CSVs, which read the findings), so the data flow reads one way: core → report → run.
"""
from __future__ import annotations

import logging
from pathlib import Path

from catalens.audit.core import DEFAULT_NEAR, AuditResult, audit_catalogue
from catalens.audit.report import write_report
from catalens.config import Config, load_config

_logger = logging.getLogger(__name__)


def run_audit(data, report: str | Path | None = None, cfg: Config | None = None,
              near: float | None = DEFAULT_NEAR, log=None, labels: bool = False, folds: int = 5) -> AuditResult:
    """Open ``data``, audit it and (with ``report``) write the report folder; ``labels``: also
    rank likely wrong labels (:mod:`catalens.audit.labels`, ``folds`` out-of-fold heads)."""
    log = log or _logger.info
    from catalens.ingest.open import open_catalogue

    cat = open_catalogue(data)
    res = audit_catalogue(cat, cfg, near, log=log)
    s = res.summary
    log(f"audit: {s['exact_groups']} exact groups, {s['near_groups']} near groups"
        + (f" (cosine >= {s['near_threshold']})" if s["near_threshold"] else "")
        + f", {s['leakage_groups']} across splits, {s['conflict_groups']} with conflicting labels")
    if labels:
        from catalens.audit.labels import audit_labels

        res.label_issues = audit_labels(cat, cfg or load_config(), folds, log=log)
        s["label_issues"] = len(res.label_issues)
    if report:
        res.report_dir = write_report(res, report)
        log(f"audit report written to {res.report_dir} (audit.html, audit.json, CSVs)")
    return res
