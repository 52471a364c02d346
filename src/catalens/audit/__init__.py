"""Catalogue audit: exact and near duplicates, leakage across splits, conflicting labels, likely label errors."""
from catalens.audit.core import DEFAULT_NEAR, AuditResult, Group, audit_catalogue
from catalens.audit.run import run_audit

__all__ = ["DEFAULT_NEAR", "AuditResult", "Group", "audit_catalogue", "run_audit"]
