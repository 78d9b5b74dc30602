"""Command-line plumbing shared by `python -m export.onnx` and `python -m export.torchscript`.

Each format adds its own arguments and its `Exporter`; parsing the model, adapter, output and
verification options, the progress lines, the printed report and the exit statuses live here.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from export.errors import ExportError, MissingRuntimeError, VerificationError
from export.files import report_path
from export.pipeline import DEFAULT_SPEC, DTYPES, Exporter, resolve_spec, run_export
from rlrr import RLRRError

EXIT_OK, EXIT_MISMATCH, EXIT_INPUT, EXIT_EXPORT, EXIT_RUNTIME, EXIT_BUG, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 70, 130

EPILOG = f"""\
model names: timm first, then torchvision ("timm:NAME" or "torchvision:NAME" picks one), or
"package.module:function" for your own builder (called with --num-classes and --model-kwargs).
With --adapter, the model, class count and image size are read from the adapter file's metadata
(written by export.adapt.save_export_adapter); flags override, a different --model is an error.
Without --weights the base has random weights (seeded, zero-initialised gammas redrawn); without
--adapter the adapter is random (seeded): the numbers then show that the path works, nothing more.

exit status: {EXIT_OK} verified (or exported with --no-verify), {EXIT_MISMATCH} outputs differ past tolerance,
{EXIT_INPUT} bad input (model name, weights, adapter, output path, options), {EXIT_EXPORT} the exporter cannot
convert the model, {EXIT_RUNTIME} the runtime to verify with is missing, {EXIT_INTERRUPTED} interrupted. On any non-zero
status nothing is written, except a failed verification with --keep-on-fail.
"""


def _img_size(text: str) -> int | tuple[int, int]:
    m = re.fullmatch(r"(\d+)(?:[x,](\d+))?", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}")
    return int(m[1]) if m[2] is None else (int(m[1]), int(m[2]))


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,4, got {text!r}") from None
    if len(sizes) < 1 or any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"batch sizes must be positive integers, got {text!r}")
    return sizes


def _kwargs(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"--model-kwargs must be a JSON object such as '{{\"depth\": 2}}': {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"--model-kwargs must be a JSON object, got {type(value).__name__}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text}")
    return value


def build_parser(prog: str, doc: str, suffix: str, add_arguments: Callable[[argparse.ArgumentParser], None]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=doc, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    m = parser.add_argument_group("model")
    m.add_argument("--model", metavar="NAME", help=f"timm or torchvision model name (default: the adapter file's model, else the demo {DEFAULT_SPEC.name})")
    m.add_argument("--weights", metavar="FILE", help="local base weights (.pth, .pt, .bin, .safetensors), loaded with strict key checking (default: random)")
    m.add_argument("--adapter", metavar="FILE", action="append",
                   help="adapter file from rlrr.save_adapter (default: a seeded random adapter); repeat it, as [NAME=]FILE, "
                        "for one file serving several tasks (python -m export.onnx; docs/serving.md)")
    m.add_argument("--num-classes", type=int, metavar="N", help="classifier size (default: the adapter file's, else the model's)")
    m.add_argument("--img-size", type=_img_size, metavar="N|HxW", help="input size (default: the adapter file's, else the model's config, else 224)")
    m.add_argument("--model-kwargs", type=_kwargs, default=None, metavar="JSON", help="extra builder arguments, e.g. '{\"depth\": 2}'")
    m.add_argument("--rank", type=int, default=1, help="rank of the random adapter (default 1)")
    o = parser.add_argument_group("output")
    o.add_argument("--out", metavar="PATH", help=f"output file (default ./rlrr-<model>{suffix}); the report goes to PATH.json")
    o.add_argument("--force", action="store_true", help="overwrite an existing output")
    o.add_argument("--keep-on-fail", action="store_true", help="keep the file (and report) when verification fails")
    v = parser.add_argument_group("verification")
    v.add_argument("--no-verify", action="store_true", help="export without comparing outputs (needs no runtime)")
    v.add_argument("--batch-sizes", type=_sizes, default=[1, 4], metavar="B1,B2", help="batch sizes to check (default 1,4)")
    v.add_argument("--inputs", type=int, default=3, metavar="N", help="seeded random inputs per batch size (default 3)")
    v.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="precision of the exported model (default fp32)")
    v.add_argument("--tolerance", type=float, metavar="REL", help="max error relative to the output's scale (default 1e-4 fp32, 1e-2 fp16)")
    v.add_argument("--seed", type=int, default=0, help="seed of random weights, random adapter and inputs (default 0)")
    v.add_argument("--latency-runs", type=_positive, default=20, metavar="N", help="timed runs per model for the latency median; 0 skips it (default 20)")
    v.add_argument("--warmup", type=_positive, default=3, metavar="N", help="untimed runs before timing (default 3)")
    v.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    add_arguments(parser)
    return parser


class StderrProgress:
    """'[3/9] exporting ... 4.2 s' lines on stderr."""

    def __call__(self, text: str, seconds: float | None) -> None:
        if seconds is None:
            sys.stderr.write(f"{text} ...")
        else:
            sys.stderr.write(f" {seconds:.1f} s\n")
        sys.stderr.flush()


def _slug(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name.split(":")[-1] if name.startswith(("timm:", "torchvision:", "tv:")) else name)


def run_cli(argv: Sequence[str] | None, *, prog: str, doc: str, suffix: str,
            add_arguments: Callable[[argparse.ArgumentParser], None], make_exporter: Callable[[argparse.Namespace], Exporter],
            run_many: Callable | None = None) -> int:
    """Parse, export, print the report; returns the exit status.

    `run_many(args, exporter, progress) -> (report, out)` exports several adapters (or, with
    `--adapter-inputs`, one) into one file; a format without it refuses a repeated --adapter.
    """
    parser = build_parser(prog, doc, suffix, add_arguments)
    args = parser.parse_args(argv)
    progress = None if args.quiet else StderrProgress()
    # reason: torch logs a once-per-process API note when timm's Swin asks is_fx_tracing(); it
    # would land in the middle of a progress line and says nothing about this export
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    adapters, args.adapter = args.adapter or [], (args.adapter or [None])[-1]
    try:
        exporter = make_exporter(args)
        if len(adapters) > 1 or getattr(args, "adapter_inputs", False):
            if run_many is None:
                raise RLRRError(f"{prog} exports one adapter; one file for several tasks is python -m export.onnx")
            args.adapter = adapters
            report, out = run_many(args, exporter, progress)
            print(report.table())
            print(f"\n  report: {report_path(out)}")
            return EXIT_OK
        spec = resolve_spec(args.model, adapter=args.adapter, num_classes=args.num_classes, img_size=args.img_size,
                            model_kwargs=args.model_kwargs, weights=args.weights)
        out = Path(args.out) if args.out else Path.cwd() / f"rlrr-{_slug(spec.name)}{getattr(exporter, 'suffix', suffix)}"
        if not args.model and not args.adapter:
            _err(f"no --model or --adapter: exporting the built-in demo, timm {spec.name} ({spec.num_classes} classes, {spec.img_size} px), "
                 f"random weights and a random adapter, to {out}")
        report = run_export(
            spec, out, exporter, adapter=args.adapter, dtype=args.dtype, batch_sizes=args.batch_sizes, inputs_per_batch=args.inputs,
            seed=args.seed, rank=args.rank, tolerance=args.tolerance, verify=not args.no_verify, latency_runs=args.latency_runs,
            warmup=args.warmup, force=args.force, keep_on_fail=args.keep_on_fail, progress=progress,
        )
    except VerificationError as e:
        if e.report is not None:
            print(e.report.table())
        _err(f"error: verification failed: {e}")
        return EXIT_MISMATCH
    except MissingRuntimeError as e:
        _err(f"error: {e}")
        return EXIT_RUNTIME
    except ExportError as e:
        _err(f"error: export failed: {e}")
        return EXIT_EXPORT
    except RLRRError as e:
        _err(f"error: {e}")
        return EXIT_INPUT
    except KeyboardInterrupt:
        _err("interrupted: nothing was written")
        return EXIT_INTERRUPTED
    except Exception:  # a bug, not bad input: show where
        _err("internal error (please report it with this traceback):\n" + traceback.format_exc())
        return EXIT_BUG
    print(report.table())
    print(f"\n  report: {report_path(out)}")
    return EXIT_OK


def _err(text: str) -> None:
    sys.stderr.write(("\n" if not text.startswith("\n") else "") + text + "\n")
    sys.stderr.flush()
