"""`python -m export.torchscript`: the folded model as TorchScript (or `torch.export` .pt2), verified.

    python -m export.torchscript                                  # the demo, ./rlrr-<model>.pt
    python -m export.torchscript --model resnet50 --out r50.pt    # TorchScript (torch.jit.trace)
    python -m export.torchscript --model resnet50 --out r50.pt2   # torch.export, dynamic batch

TorchScript is written with `torch.jit.trace` (not `script`: most timm models are not scriptable,
and a folded model has no control flow that depends on its input), saved with `torch.jit.save`. `.pt2` is `torch.export` (TorchScript's successor, with a declared dynamic batch
axis), saved with `torch.export.save`. Either file is reloaded (`torch.jit.load` /
`torch.export.load`) and verified against the unmerged model like the ONNX export.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

import rlrr
from export.errors import ExportError, VerificationError, refusal
from export.pipeline import ModelSpec, run_export
from export.report import ExportReport
from export.verify import flatten

FORMATS = ("torchscript", "pt2")
SUFFIXES = {"torchscript": ".pt", "pt2": ".pt2"}


class TorchRunner:
    """A reloaded TorchScript module or ExportedProgram, run on the model's device."""

    def __init__(self, module, kind: str, note: str) -> None:
        self.module, self.kind, self.note = module, kind, note
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        self.providers = [f"PyTorch {torch.__version__} ({device.type})"]

    @torch.no_grad()
    def run(self, x: Tensor) -> list[Tensor]:
        device = next((p.device for p in self.module.parameters()), x.device)
        try:
            return flatten(self.module(x.to(device)))
        except Exception as e:
            raise VerificationError(f"the reloaded {self.kind} cannot run input {tuple(x.shape)} {x.dtype}: {type(e).__name__}: {e}") from e


class TorchExporter:
    """`torch.jit.trace` + `torch.jit.save`, or `torch.export` + `torch.export.save`."""

    tool = "export.torchscript"

    def __init__(self, format: str = "torchscript") -> None:
        if format not in FORMATS:
            raise rlrr.ConfigError(f"format must be one of {FORMATS}, got {format!r}")
        self.format = format
        self.suffix = SUFFIXES[format]

    def options(self) -> dict:
        if self.format == "pt2":
            return {"exporter": "torch.export", "dynamic axes": "batch (declared)"}
        return {"exporter": "torch.jit.trace", "dynamic axes": "batch (traced shapes; checked at each batch size)"}

    def require_runtime(self) -> None:
        """PyTorch itself reloads the file: nothing else to install."""

    def companions(self, out: Path) -> list[Path]:
        return []

    @torch.no_grad()
    def export(self, model: nn.Module, example: Tensor, path: Path, output_names: list[str]) -> list[Path]:
        try:
            if self.format == "pt2":
                batch = torch.export.Dim("batch", min=1)
                program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
                torch.export.save(program, str(path))
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", torch.jit.TracerWarning)  # verification at 2 batch sizes checks what they warn about
                    traced = torch.jit.trace(model, example, check_trace=False)
                torch.jit.save(traced, str(path))
        except Exception as e:  # the tracers raise many kinds; all mean "this model did not export"
            via = "torch.export" if self.format == "pt2" else "torch.jit.trace"
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise refusal(e, f"writing {path.name}") or ExportError(f"{via} cannot export {type(model).__name__}: {type(e).__name__}: {first[:800]}") from e
        return [path]

    def check(self, path: Path) -> None:
        """Reloading in `load` is the check: TorchScript and .pt2 have no separate checker."""

    def load(self, path: Path) -> TorchRunner:
        try:
            if self.format == "pt2":
                return TorchRunner(torch.export.load(str(path)).module(), "ExportedProgram", ".pt2 reloaded with torch.export.load")
            return TorchRunner(torch.jit.load(str(path), map_location="cpu").eval(), "TorchScript module", "reloaded with torch.jit.load")
        except Exception as e:
            raise refusal(e, f"loading {path.name}") or ExportError(f"cannot reload the saved {self.format} file: {type(e).__name__}: {e}") from e


def export_torchscript(
    model: nn.Module | ModelSpec | str | None,
    out: str | os.PathLike,
    *,
    format: str | None = None,
    adapter: str | os.PathLike | None = None,
    input_shape: Sequence[int] | None = None,
    dtype: str = "fp32",
    batch_sizes: Sequence[int] = (1, 4),
    inputs_per_batch: int = 3,
    seed: int = 0,
    rank: int = 1,
    tolerance: float | None = None,
    verify: bool = True,
    latency_runs: int = 20,
    warmup: int = 3,
    force: bool = False,
    keep_on_fail: bool = False,
    progress=None,
) -> ExportReport:
    """Fold, write TorchScript (`format="torchscript"`) or a torch.export `.pt2` (`"pt2"`), reload, verify.

    `format` defaults to the suffix of `out` (`.pt2` -> pt2, anything else TorchScript). The other
    arguments are `export.onnx.export_onnx`'s.
    """
    format = _format(format, out)
    return run_export(
        model, out, TorchExporter(format), adapter=adapter, input_shape=input_shape, dtype=dtype, batch_sizes=batch_sizes,
        inputs_per_batch=inputs_per_batch, seed=seed, rank=rank, tolerance=tolerance, verify=verify,
        latency_runs=latency_runs, warmup=warmup, force=force, keep_on_fail=keep_on_fail, progress=progress,
    )


def _add_arguments(parser) -> None:
    group = parser.add_argument_group("format")
    group.add_argument("--format", choices=FORMATS, default=None,
                       help="torchscript (torch.jit.trace, .pt) or pt2 (torch.export, .pt2); default: from --out's suffix, else torchscript")


def _format(format: str | None, out) -> str:
    """The format asked, else the one `out`'s suffix names; a contradiction is an error, not a misnamed file."""
    suffix = Path(os.fsdecode(os.fspath(out))).suffix if out is not None else ""
    named = {v: k for k, v in SUFFIXES.items()}.get(suffix)
    if format is not None and named is not None and named != format:
        raise rlrr.ConfigError(f"format {format!r} but --out ends in {suffix!r} ({named}): make them agree (a {format} file is named *{SUFFIXES.get(format, '')})")
    return format or ("pt2" if suffix == ".pt2" else "torchscript")


def _make_exporter(args) -> TorchExporter:
    return TorchExporter(_format(args.format, args.out))


def main(argv: Sequence[str] | None = None) -> int:
    from export.cli import run_cli

    return run_cli(argv, prog="python -m export.torchscript", doc=__doc__, suffix=".pt", add_arguments=_add_arguments, make_exporter=_make_exporter)


if __name__ == "__main__":
    sys.exit(main())
