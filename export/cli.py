"""Command-line plumbing shared by `python -m export.onnx` and `python -m export.torchscript`.

Each format adds its own arguments and its `Exporter`; parsing the model, adapter, output and
verification options, the progress lines, the printed report and the exit statuses live here.
Every failure ends in one line on stderr and the status `EXIT_STATUSES` gives its class; the
traceback only with `--debug` (or RLRR_DEBUG=1). Options are checked as they are parsed, against
the same limits the library checks (`export.options.LIMITS`), so a bad one costs no work.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from export.errors import ExportError, MissingRuntimeError, OutputError, ResourceError, VerificationError, refusal
from export.files import report_path
from export.options import LIMITS, arg_type, check_img_size, check_int, check_tolerance
from export.pipeline import DEFAULT_SPEC, DTYPES, Exporter, resolve_spec, run_export
from rlrr import ConfigError, RLRRError

EXIT_OK, EXIT_MISMATCH, EXIT_INPUT, EXIT_EXPORT, EXIT_RUNTIME, EXIT_SYSTEM = 0, 1, 2, 3, 4, 5
EXIT_BUG, EXIT_INTERRUPTED, EXIT_TERMINATED = 70, 130, 143


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, docker stop, timeout): unwinds like Ctrl-C, so the staging folder goes."""


#: exception class -> exit status, first match wins (subclasses before their bases). argparse's
#: errors are ConfigError (2); anything else is a bug: EXIT_BUG, its traceback with --debug.
EXIT_STATUSES: tuple[tuple[type[BaseException], int, str], ...] = (
    (VerificationError, EXIT_MISMATCH, "outputs differ past tolerance"),
    (MissingRuntimeError, EXIT_RUNTIME, "the runtime to verify with is missing (onnxruntime, a CUDA provider)"),
    (ResourceError, EXIT_SYSTEM, "the system refused mid-export: disk full, quota, permission, read-only file system, out of memory"),
    (ExportError, EXIT_EXPORT, "the exporter cannot convert the model (an op it has no translation for)"),
    (RLRRError, EXIT_INPUT, "bad input: an option, the model name or arguments, weights, adapter, --out (checked before any work, unwritable included)"),
    (OSError, EXIT_SYSTEM, "the system refused (a file operation failed)"),
    (Terminated, EXIT_TERMINATED, "terminated (SIGTERM)"),
    (KeyboardInterrupt, EXIT_INTERRUPTED, "interrupted (Ctrl-C)"),
)


def status_of(error: BaseException) -> int:
    """The exit status of a failure: the first row of EXIT_STATUSES it is an instance of, else EXIT_BUG."""
    return next((status for cls, status, _ in EXIT_STATUSES if isinstance(error, cls)), EXIT_BUG)


def _status_lines() -> str:
    rows = {EXIT_OK: "verified (or exported with --no-verify)"}
    for _, status, what in EXIT_STATUSES:
        rows.setdefault(status, what)
    rows[EXIT_BUG] = "an internal error (a bug: please report it with the --debug traceback)"
    return "\n".join(f"  {status:>3}  {what}" for status, what in sorted(rows.items()))


EPILOG = f"""\
model names: timm first, then torchvision ("timm:NAME" or "torchvision:NAME" picks one), or
"package.module:function" for your own builder (called with --num-classes and --model-kwargs).
With --adapter, the model, class count and image size are read from the adapter file's metadata
(written by export.adapt.save_export_adapter); flags override, a different --model is an error.
Without --weights the base has random weights (seeded, zero-initialised gammas redrawn); without
--adapter the adapter is random (seeded): the numbers then show that the path works, nothing more.
The same flags and --seed give the same weights, adapter, inputs and files.

limits: batch sizes {LIMITS['batch size'][0]}-{LIMITS['batch size'][1]} (at most {LIMITS['number of batch sizes'][1]} of them), --inputs {LIMITS['inputs per batch'][0]}-{LIMITS['inputs per batch'][1]}, --img-size {LIMITS['image size'][0]}-{LIMITS['image size'][1]}, --seed 0-2^32-1,
--tolerance in (0, 1), --latency-runs 0-{LIMITS['latency runs'][1]}, --warmup 0-{LIMITS['warmup runs'][1]}, --num-classes 0-{LIMITS['class count'][1]:,}; each option once.

exit status (one line on stderr says why; the traceback only with --debug or RLRR_DEBUG=1):
{_status_lines()}
On any non-zero status nothing is written, except a failed verification with --keep-on-fail.
"""


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are ConfigError: one line, status 2, like every bad input."""

    def error(self, message: str):
        raise ConfigError(f"{message} (see {self.prog} --help)")


class _Once(argparse.Action):
    """Store the value; an option given twice is an error (argparse would silently keep the last)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        given = namespace.__dict__.setdefault("_given", set())
        if self.dest in given:
            if self.dest == "adapter":
                raise argparse.ArgumentError(self, "one --adapter per export until multi-task export exists")
            raise argparse.ArgumentError(self, f"given twice ({getattr(namespace, self.dest)!r} and {values!r}): give it once")
        given.add(self.dest)
        setattr(namespace, self.dest, values)


def _img_size(text: str) -> int | tuple[int, int]:
    m = re.fullmatch(r"(\d+)(?:[x,](\d+))?", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}")
    try:
        return check_img_size(int(m[1]) if m[2] is None else (int(m[1]), int(m[2])))
    except (ConfigError, ValueError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers such as 1,4, got {text!r}") from None
    try:
        check_int("number of batch sizes", len(sizes))
        return [check_int("batch size", s) for s in sizes]
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _kwargs(text: str) -> dict:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:  # RecursionError: '[[[[...' nested past Python's limit
        raise argparse.ArgumentTypeError(f"--model-kwargs must be a JSON object such as '{{\"depth\": 2}}': {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"--model-kwargs must be a JSON object such as '{{\"depth\": 2}}', got {type(value).__name__}")
    return value


def build_parser(prog: str, doc: str, suffix: str, add_arguments: Callable[[argparse.ArgumentParser], None]) -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description=doc, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.register("action", None, _Once)  # every option that takes a value: once
    parser.register("action", "store", _Once)
    m = parser.add_argument_group("model")
    m.add_argument("--model", metavar="NAME", help=f"timm or torchvision model name (default: the adapter file's model, else the demo {DEFAULT_SPEC.name})")
    m.add_argument("--weights", metavar="FILE", help="local base weights (.pth, .pt, .bin, .safetensors), loaded with strict key checking (default: random)")
    m.add_argument("--adapter", metavar="FILE", action="append",
                   help="adapter file from rlrr.save_adapter (default: a seeded random adapter); repeat it, as [NAME=]FILE, "
                        "for one file serving several tasks (python -m export.onnx; docs/serving.md)")
    m.add_argument("--num-classes", type=arg_type(check_int, int, "class count"), metavar="N", help="classifier size (default: the adapter file's, else the model's)")
    m.add_argument("--img-size", type=_img_size, metavar="N|HxW", help="input size (default: the adapter file's, else the model's config, else 224)")
    m.add_argument("--model-kwargs", type=_kwargs, default=None, metavar="JSON", help="extra builder arguments, e.g. '{\"depth\": 2}'")
    m.add_argument("--rank", type=arg_type(check_int, int, "rank"), default=1, help="rank of the random adapter (default 1)")
    o = parser.add_argument_group("output")
    o.add_argument("--out", metavar="PATH", help=f"output file (default ./rlrr-<model>{suffix}); the report goes to PATH.json")
    o.add_argument("--force", action="store_true", help="overwrite an existing output")
    o.add_argument("--keep-on-fail", action="store_true", help="keep the file (and report) when verification fails")
    v = parser.add_argument_group("verification")
    v.add_argument("--no-verify", action="store_true", help="export without comparing outputs (needs no runtime)")
    v.add_argument("--batch-sizes", type=_sizes, default=[1, 4], metavar="B1,B2", help="batch sizes to check (default 1,4)")
    v.add_argument("--inputs", type=arg_type(check_int, int, "inputs per batch"), default=3, metavar="N", help="seeded random inputs per batch size (default 3)")
    v.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                   help="precision of the exported model: fp32, fp16; bf16 (TorchScript/.pt2); int8 (ONNX, see the INT8 options) (default fp32)")
    v.add_argument("--tolerance", type=arg_type(check_tolerance, float), metavar="REL",
                   help="max error relative to the output's scale (default 1e-4 fp32, scaled up to 4x the model's own fp32-vs-fp64 error "
                        "when that is larger; 1e-2 fp16; 5e-2 bf16; int8: per module, for locating a failed check, 0.1)")
    v.add_argument("--seed", type=arg_type(check_int, int, "seed"), default=0, help="seed of random weights, random adapter and inputs (default 0)")
    v.add_argument("--latency-runs", type=arg_type(check_int, int, "latency runs"), default=20, metavar="N", help="timed runs per model for the latency median; 0 skips it (default 20)")
    v.add_argument("--warmup", type=arg_type(check_int, int, "warmup runs"), default=3, metavar="N", help="untimed runs before timing (default 3)")
    v.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    v.add_argument("--debug", action="store_true", help="on failure, print the traceback too (or set RLRR_DEBUG=1)")
    add_arguments(parser)
    return parser


class StderrProgress:
    """'[3/9] exporting ... 4.2 s' lines on stderr."""

    def __init__(self) -> None:
        self.open = False  # a step line waits for its time

    def __call__(self, text: str, seconds: float | None) -> None:
        if seconds is None:
            _write(sys.stderr, f"{text} ...")
        else:
            _write(sys.stderr, f" {seconds:.1f} s\n")
        self.open = seconds is None


def _slug(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name.split(":")[-1] if name.startswith(("timm:", "torchvision:", "tv:")) else name)


def _debug(argv: Sequence[str]) -> bool:
    return "--debug" in argv or os.environ.get("RLRR_DEBUG", "") not in ("", "0")


def run_cli(argv: Sequence[str] | None, *, prog: str, doc: str, suffix: str,
            add_arguments: Callable[[argparse.ArgumentParser], None], make_exporter: Callable[[argparse.Namespace], Exporter],
            run_many: Callable | None = None) -> int:
    """Parse, export, print the report; returns the exit status (EXIT_STATUSES).

    `run_many(args, exporter, progress) -> (report, out)` exports several adapters (or, with
    `--adapter-inputs`, one) into one file; a format without it refuses a repeated --adapter.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    progress = None
    # reason: torch logs a once-per-process API note when timm's Swin asks is_fx_tracing(); it
    # would land in the middle of a progress line and says nothing about this export
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    signals, quiet_logs = _Signals(), _QuietLogs(enabled=not _debug(argv))
    try:
        args = build_parser(prog, doc, suffix, add_arguments).parse_args(argv)
        progress = None if args.quiet else StderrProgress()
        adapters, args.adapter = args.adapter or [], (args.adapter or [None])[-1]
        exporter = make_exporter(args)
        if len(adapters) > 1 or getattr(args, "adapter_inputs", False):
            if run_many is None:
                raise RLRRError(f"{prog} exports one adapter; one file for several tasks is python -m export.onnx")
            args.adapter = adapters
            report, out = run_many(args, exporter, progress)
            _write(sys.stdout, report.table() + f"\n\n  report: {report_path(Path(out))}\n")
            return EXIT_OK
        spec = resolve_spec(args.model, adapter=args.adapter, num_classes=args.num_classes, img_size=args.img_size,
                            model_kwargs=args.model_kwargs, weights=args.weights)
        out = args.out if args.out is not None else _default_out(spec.name, getattr(exporter, "suffix", suffix))
        if not args.model and not args.adapter and not args.quiet:
            _err(f"no --model or --adapter: exporting the built-in demo, timm {spec.name} ({spec.num_classes} classes, {spec.img_size} px), "
                 f"random weights and a random adapter, to {out}", progress)
        report = run_export(
            spec, out, exporter, adapter=args.adapter, dtype=args.dtype, batch_sizes=args.batch_sizes, inputs_per_batch=args.inputs,
            seed=args.seed, rank=args.rank, tolerance=args.tolerance, verify=not args.no_verify, latency_runs=args.latency_runs,
            warmup=args.warmup, force=args.force, keep_on_fail=args.keep_on_fail, progress=progress,
        )
        _write(sys.stdout, report.table() + f"\n\n  report: {report_path(Path(report.out))}\n")
        return EXIT_OK
    except BaseException as e:  # noqa: BLE001 -- every failure ends here: one line, one status
        if isinstance(e, SystemExit):  # --help, --version
            raise
        return _fail(signals.interruption() or e, progress, _debug(argv))
    finally:
        quiet_logs.close()
        signals.restore()


def _default_out(name: str, suffix: str) -> str:
    try:
        here = Path.cwd()
    except OSError as e:  # the current folder was removed under us
        raise OutputError(f"the current folder is gone ({e.strerror}): pass --out") from e
    return str(here / f"rlrr-{_slug(name)}{suffix}")


def _fail(error: BaseException, progress: StderrProgress | None, debug: bool) -> int:
    if not isinstance(error, (RLRRError, KeyboardInterrupt)):
        error = refusal(error, "exporting") or error  # a raw OSError or MemoryError from below: the system's
    status = status_of(error)
    if isinstance(error, VerificationError) and error.report is not None:
        _write(sys.stdout, error.report.table() + "\n")
    if debug:
        _err("".join(traceback.format_exception(error)).rstrip(), progress)
    if status == EXIT_BUG:
        text = f"internal error (a bug; please report it{'' if debug else ' with the traceback of --debug or RLRR_DEBUG=1'}): {type(error).__name__}: {error}"
    elif isinstance(error, KeyboardInterrupt):
        text = f"{'terminated' if isinstance(error, Terminated) else 'interrupted'}: nothing was written"
    else:
        text = f"error: {error}"
    _err(_one_line(text), progress)
    return status


def _one_line(text: str) -> str:
    return " | ".join(line.strip() for line in str(text).splitlines() if line.strip())[:4000]


class _QuietLogs(logging.Handler):
    """Keep libraries' log warnings (onnxscript's version converter logs whole tracebacks) off stderr,
    where the CLI prints progress and one line per failure; --debug lets them through."""

    def __init__(self, enabled: bool) -> None:
        super().__init__(logging.WARNING)
        self.root = logging.getLogger()
        self.enabled = enabled and not self.root.handlers  # a configured root logger is the caller's choice
        if self.enabled:
            self.root.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        pass

    def close(self) -> None:
        if self.enabled:
            self.root.removeHandler(self)
            self.enabled = False
        super().close()


class _Signals:
    """SIGTERM (kill, docker stop, timeout) unwinds like Ctrl-C, so the staging folder goes; both are
    remembered, so one that a library swallowed (a C extension's import turns it into ImportError)
    still ends the run as interrupted, not as a missing runtime."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    def interruption(self) -> KeyboardInterrupt | None:
        if self.received is None:
            return None
        return Terminated() if self.received == signal.SIGTERM else KeyboardInterrupt()

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}


def _write(stream, text: str) -> None:
    """Write to a console that may not encode every character of a path (surrogates, LANG=C)."""
    encoding = getattr(stream, "encoding", None) or "utf-8"
    stream.write(text.encode(encoding, "backslashreplace").decode(encoding, "replace"))
    stream.flush()


def _err(text: str, progress: StderrProgress | None = None) -> None:
    if progress is not None and progress.open:
        _write(sys.stderr, "\n")
        progress.open = False
    _write(sys.stderr, text + "\n")
