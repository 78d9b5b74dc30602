"""`python -m export.onnx`: fold an RLRR model, export ONNX, verify it in onnxruntime.

    python -m export.onnx                                   # the built-in demo, into ./
    python -m export.onnx --model vit_base_patch16_224      # random weights, random adapter
    python -m export.onnx --adapter adapter.safetensors --weights base.pth --out model.onnx

The ONNX file is written with torch's dynamo exporter (`torch.onnx.export(dynamo=True)`) with a
dynamic batch axis, as one self-contained file below 2 GB and with external data above
(`model.onnx.data`), checked with `onnx.checker` (full check, by path) and run in onnxruntime
(CUDA where onnxruntime-gpu and a GPU are present, else CPU), against the unmerged model.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch import Tensor, nn

import rlrr
from export.errors import ExportError, VerificationError, refusal
from export.files import data_path
from export.localize import exported_values, module_outputs
from export.options import arg_type, check_fraction, check_int
from export.pipeline import ModelSpec, run_export
from export.quantize import DEFAULT_CALIBRATION_IMAGES, DEFAULT_EVAL_IMAGES, DEFAULT_MIN_AGREEMENT, QuantOptions
from export.report import ExportReport
from export.verify import PROVIDERS, Session, make_session, provider_list

DEFAULT_OPSET = 20  # torch 2.14's default; onnxruntime >= 1.17 runs it
MIN_OPSET = 18  # torch's dynamo exporter writes at least this (it silently raised a lower request)
EXTERNAL_DATA = ("auto", "yes", "no")
PROTOBUF_LIMIT = 2**31  # a single .onnx file cannot exceed 2 GiB
_MARGIN = 64 * 2**20  # room for the graph itself


def check_opset(opset) -> int:
    """An opset the exporter writes as asked: from MIN_OPSET to the newest the installed onnx knows."""
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise rlrr.ConfigError(f"opset must be a whole number from {MIN_OPSET} to {newest} (the installed onnx's newest), got {opset!r}")
    return opset


def model_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers the ONNX file would hold."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_OP_PATTERNS = (
    re.compile(r"No ONNX function found for <OpOverload\(op='([\w.]+)', overload='(\w+)'\)"),
    re.compile(r"target=torch\.ops\.([\w.]+)"),
    re.compile(r"Unsupported FX nodes: (\{.*?\})"),
)


def unsupported_op(error: BaseException) -> str | None:
    """The op named in an exporter error, if any ("mylib.op.default")."""
    seen = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = _ANSI.sub("", str(e))
        for pattern in _OP_PATTERNS:
            m = pattern.search(text)
            if m:
                return ".".join(g for g in m.groups() if g)
        e = e.__cause__ or e.__context__
    return None


def _summary(error: BaseException) -> str:
    text = _ANSI.sub("", str(error)).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    keep = [line for line in lines if line.startswith("<class") or "Error" in line[:60]] or lines[:3]
    return " | ".join(keep[:3])[:1200]


class OnnxRunner:
    """An onnxruntime session that takes torch tensors."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.providers = session.providers
        self.note = session.note

    def run(self, x: Tensor) -> list[np.ndarray]:
        try:
            return self.session.run(x.detach().cpu().numpy())
        except Exception as e:  # onnxruntime's own exception types are not importable portably
            raise VerificationError(f"onnxruntime cannot run the exported model on input {tuple(x.shape)} {x.dtype}: {type(e).__name__}: {e}") from e


class OnnxExporter:
    """Writes, checks and reloads ONNX (see the module docstring)."""

    tool = "export.onnx"
    format = "onnx"
    suffix = ".onnx"
    dtypes = ("fp32", "fp16", "int8")

    def __init__(self, *, opset: int = DEFAULT_OPSET, provider: str = "auto", external_data: str = "auto",
                 quantization: QuantOptions | None = None) -> None:
        if provider not in PROVIDERS:
            raise rlrr.ConfigError(f"provider must be one of {PROVIDERS}, got {provider!r}")
        if external_data not in EXTERNAL_DATA:
            raise rlrr.ConfigError(f"external_data must be one of {EXTERNAL_DATA}, got {external_data!r}")
        opset = check_opset(opset)
        self.opset, self.provider, self.external_data = opset, provider, external_data
        self.quantization = quantization  # INT8 options (dtype "int8"); None: the defaults
        self.used_external: bool | None = None

    def options(self) -> dict:
        data = {"auto": "if over 2 GB", "yes": "yes", "no": "no"}[self.external_data]
        if self.used_external is not None:
            data = "yes (weights in a .data file beside it)" if self.used_external else "no (one self-contained file)"
        return {"exporter": "torch.onnx dynamo", "opset": self.opset, "dynamic axes": "batch", "external data": data}

    def require_runtime(self) -> None:
        provider_list(self.provider)

    def companions(self, out: Path) -> list[Path]:
        return [data_path(out)]

    def _external(self, model: nn.Module) -> bool:
        size = model_bytes(model)
        if self.external_data == "no" and size > PROTOBUF_LIMIT - _MARGIN:
            raise ExportError(f"the model holds {size / 2**30:.2f} GiB of weights: above ONNX's 2 GiB single-file limit, it needs external data (external_data='auto' or 'yes')")
        return self.external_data == "yes" or (self.external_data == "auto" and size > PROTOBUF_LIMIT - _MARGIN)

    def export(self, model: nn.Module, example: Tensor, path: Path, output_names: list[str]) -> list[Path]:
        import torch

        external = self.used_external = self._external(model)  # options() reports the last (folded) export
        batch = torch.export.Dim("batch", min=1)
        try:
            torch.onnx.export(
                model, (example,), str(path), dynamo=True, dynamic_shapes=({0: batch},), external_data=external,
                opset_version=self.opset, input_names=["input"], output_names=output_names, verbose=False,
            )
        except Exception as e:  # the exporter raises many kinds; all mean "this model did not export", unless the system refused
            op = unsupported_op(e)
            what = f"op {op} has no ONNX translation at opset {self.opset}" if op else _summary(e)
            hint = " (register one with torch.onnx's custom_translation_table, or replace the op)" if op else ""
            raise refusal(e, f"writing {path.name}") or ExportError(f"torch.onnx cannot export {type(model).__name__}: {what}{hint}") from e
        files = [path] + ([data_path(path)] if data_path(path).exists() else [])
        return files

    def check(self, path: Path) -> None:
        import onnx

        try:
            proto = onnx.load(str(path), load_external_data=False)
            written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
            del proto
            if written != self.opset:  # torch's version converter gave up and kept its own opset
                raise ExportError(f"torch.onnx cannot convert this model to opset {self.opset} (the file is opset {written}): choose another --opset; "
                                  f"{DEFAULT_OPSET} is tested")
            onnx.checker.check_model(str(path), full_check=True)  # by path: works past 2 GB
        except ExportError:
            raise
        except Exception as e:
            raise refusal(e, f"checking {path.name}") or ExportError(f"onnx.checker rejects the exported file: {type(e).__name__}: {e}") from e

    def load(self, path: Path) -> OnnxRunner:
        try:
            return OnnxRunner(make_session(str(path), self.provider))
        except (ImportError, ExportError):
            raise
        except Exception as e:
            raise refusal(e, f"loading {path.name}") or ExportError(f"onnxruntime cannot load the exported file: {type(e).__name__}: {e}") from e

    def intermediates(self, path: Path, modules: dict, x: Tensor, reference: Path | None = None) -> dict:
        """Each module's output in the file at `path` on `x`, found through the exporter's name scopes
        in `reference` (the fp32 export; a QDQ file keeps its value names), see export.localize."""
        import onnx

        graph = onnx.load(str(reference or path), load_external_data=False).graph
        mapping = {m: v for m, v in module_outputs(graph).items() if m in modules}
        values = exported_values(path, sorted(set(mapping.values())), x.detach().cpu().numpy(), lambda p: make_session(p, self.provider).session)
        return {m: values[v] for m, v in mapping.items() if v in values}


def export_onnx(
    model: nn.Module | ModelSpec | str | None,
    out: str | os.PathLike,
    *,
    adapter: str | os.PathLike | None = None,
    opset: int = DEFAULT_OPSET,
    provider: str = "auto",
    external_data: str = "auto",
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
    calibration: str | os.PathLike | None = None,
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
    eval_images: int = DEFAULT_EVAL_IMAGES,
    keep_fp32: Sequence[str] = (),
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
) -> ExportReport:
    """Fold `model`'s RLRR adapters, export ONNX to `out`, verify it in onnxruntime, write `out.json`.

    `model`: a module (never changed: a deep copy is adapted and folded), a `ModelSpec` / name to
    build, or None for the model the adapter file names. The adapter: `adapter` file, else the model's own, else a
    seeded random one. `input_shape` is (C, H, W) (default: the model's config, else 3x224x224).
    Verification runs `inputs_per_batch` seeded inputs at each of `batch_sizes` through the file
    and through the unmerged model; it passes when max |diff| / max |expected| <= `tolerance`
    (default 1e-4 fp32, 1e-2 fp16) for every output. `provider`: "auto" (CUDA if onnxruntime-gpu
    runs, else CPU), "cuda" or "cpu". `external_data`: "auto" (above 2 GB), "yes" or "no".
    Latency: median of `latency_runs` after `warmup`, folded vs the base model's own export
    (0 skips it). Returns the report; raises VerificationError past tolerance (file removed
    unless `keep_on_fail`), ExportError, MissingRuntimeError (onnxruntime absent and `verify`),
    OutputError, and rlrr's errors for bad models or adapter files.

    `dtype="int8"`: the fp32 export is quantized (export.quantize) with `calibration_images` from
    `calibration` (a folder, export.calibration; None: seeded random inputs, warned), modules matching
    `keep_fp32` (fnmatch globs on module names) stay float, and the check is top-1 agreement with the
    unmerged fp32 model on `eval_images` held-out inputs: it passes at `min_agreement` or above.
    """
    quantization = None
    if dtype != "int8" and (calibration is not None or keep_fp32):
        raise rlrr.ConfigError(f"calibration and keep_fp32 are for dtype='int8' only (got dtype={dtype!r})")
    if dtype == "int8":
        quantization = QuantOptions(None if calibration is None else str(calibration), calibration_images, eval_images,
                                    tuple(keep_fp32), min_agreement)
    exporter = OnnxExporter(opset=opset, provider=provider, external_data=external_data, quantization=quantization)
    return run_export(
        model, out, exporter, adapter=adapter, input_shape=input_shape, dtype=dtype, batch_sizes=batch_sizes,
        inputs_per_batch=inputs_per_batch, seed=seed, rank=rank, tolerance=tolerance, verify=verify,
        latency_runs=latency_runs, warmup=warmup, force=force, keep_on_fail=keep_on_fail, progress=progress,
    )


def _add_arguments(parser) -> None:
    group = parser.add_argument_group("ONNX")
    group.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    group.add_argument("--provider", choices=PROVIDERS, default="auto",
                       help="onnxruntime provider for verification and latency: auto = CUDA where onnxruntime-gpu and a GPU are present, else CPU (default auto)")
    group.add_argument("--external-data", choices=EXTERNAL_DATA, default="auto",
                       help="write weights to OUT.data: auto = only above ONNX's 2 GB single-file limit (default auto)")
    group.add_argument("--adapter-inputs", action="store_true",
                       help="with --adapter files: a base file whose adapter tensors and head are graph inputs, plus one "
                            "OUT-stem.<task>.onnx_adapter per task for onnxruntime's LoraAdapter (default: one routed file "
                            "with a task input; docs/serving.md)")
    q = parser.add_argument_group("INT8 (--dtype int8: static QDQ quantization with onnxruntime, checked by top-1 agreement)")
    q.add_argument("--calibration", metavar="DIR", help="calibration images: an ImageFolder tree or the fine-tuning data layout; "
                   "held-out images (test/val split) check agreement (default: seeded random inputs, which say little)")
    q.add_argument("--calibration-images", type=arg_type(check_int, int, "calibration images"), default=DEFAULT_CALIBRATION_IMAGES, metavar="N",
                   help=f"images that set the activation ranges (default {DEFAULT_CALIBRATION_IMAGES})")
    q.add_argument("--eval-images", type=arg_type(check_int, int, "held-out images"), default=DEFAULT_EVAL_IMAGES, metavar="N",
                   help=f"held-out images the agreement is measured on (default {DEFAULT_EVAL_IMAGES})")
    q.add_argument("--keep-fp32", action="append", default=[], metavar="GLOB",
                   help="keep the modules matching GLOB (module names, e.g. 'blocks.11.mlp.fc2' or 'head') in float; repeatable")
    q.add_argument("--min-agreement", type=arg_type(check_fraction, float, "--min-agreement"), default=None, metavar="F",
                   help=f"top-1 agreement with the unmerged fp32 model needed to pass, in [0, 1] (default {DEFAULT_MIN_AGREEMENT})")


def _make_exporter(args) -> OnnxExporter:
    quantization = None
    int8_only = {"--calibration": args.calibration is not None, "--keep-fp32": bool(args.keep_fp32), "--min-agreement": args.min_agreement is not None}
    if args.dtype == "int8":
        quantization = QuantOptions(args.calibration, args.calibration_images, args.eval_images, tuple(args.keep_fp32),
                                    DEFAULT_MIN_AGREEMENT if args.min_agreement is None else args.min_agreement)
    elif any(int8_only.values()):
        given = [k for k, v in int8_only.items() if v]
        raise rlrr.ConfigError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for --dtype int8 only (got --dtype {args.dtype})")
    return OnnxExporter(opset=args.opset, provider=args.provider, external_data=args.external_data, quantization=quantization)


def main(argv: Sequence[str] | None = None) -> int:
    from export.cli import run_cli
    from export.multitask import run_many

    return run_cli(argv, prog="python -m export.onnx", doc=__doc__, suffix=".onnx", add_arguments=_add_arguments,
                   make_exporter=_make_exporter, run_many=run_many)


if __name__ == "__main__":
    sys.exit(main())
