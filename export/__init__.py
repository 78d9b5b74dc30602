"""Deployment: fold the adapters (Eq. 20) into a plain model, export it and verify the export.

`fold` / `fold_with_report` are imported eagerly; the exporters load on first use, so
`python -m export.onnx` does not import its own module twice.
"""

from export.fold import FoldReport, fold, fold_with_report

_LAZY = {
    "export_onnx": "export.onnx",
    "export_multitask": "export.multitask",
    "export_torchscript": "export.torchscript",
    "ModelSpec": "export.pipeline",
    "ExportReport": "export.report",
    "random_adapter": "export.adapt",
    "save_export_adapter": "export.adapt",
}

__all__ = ["FoldReport", "fold", "fold_with_report", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'export' has no attribute {name!r}")
