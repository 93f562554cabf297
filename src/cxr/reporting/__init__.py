"""Turning predictions into evidence: scores, statistics, the comparison, tables, report and figures."""
