"""Deployment: fold the adapters (Eq. 20) into a plain model."""

from export.fold import FoldReport, fold, fold_with_report

__all__ = ["FoldReport", "fold", "fold_with_report"]
