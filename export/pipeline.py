"""The deployment path shared by every format: build, adapt, fold, export, check, verify, time.

    build base -> (export base, for latency) -> adapter (file / model's own / seeded random)
    -> reference outputs of the *unmerged* model -> fold (Eq. 20) -> export -> check
    -> reload in the runtime -> compare at several batch sizes -> latency -> report

The format-specific parts (how to write, check and reload a file) are an `Exporter`; see
`export.onnx` and `export.torchscript`. Reference outputs are computed from the unmerged model
itself, before it is folded, so no second adapted copy is kept for them.
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn

import rlrr
import zoo
from export.adapt import AdapterInfo, describe_random, random_adapter, read_metadata
from export.errors import ModelError, VacuousCheckWarning, VerificationError, refusal
from export.files import Staging, output_path, report_path
from export.options import LOADING_KWARGS, check_budget, check_img_size, check_int, check_options, check_path, check_shape, input_file
from export.fold import fold_with_report
from export.report import ExportReport, Latency, ModelInfo
from export.verify import compare, flatten, make_inputs, median_latency, paired_latency, reference_outputs, sample_independent
from export.wake import wake

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
Progress = Callable[[str, "float | None"], None]  # (step text, None at start / seconds at the end)

@dataclass
class ModelSpec:
    """A base model to build by name (timm, torchvision, or `package.module:function`)."""

    name: str
    num_classes: int | None = None
    img_size: int | tuple[int, int] | None = None
    model_kwargs: dict = field(default_factory=dict)
    weights: str | os.PathLike | None = None  # local base weights; None: random init, woken (see export.wake)
    preset: str | None = None  # a zoo preset named by the adapter file: built through zoo.build_base
    tiny: bool = False  # the zoo preset's test-size twin

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip() or "\x00" in self.name:
            raise rlrr.ConfigError(f"model name must be a non-empty name such as 'resnet50', got {self.name!r}")
        if self.num_classes is not None:
            self.num_classes = check_int("class count", self.num_classes)
        if self.img_size is not None:
            self.img_size = check_img_size(self.img_size)
        if not isinstance(self.model_kwargs, dict) or not all(isinstance(k, str) and k.isidentifier() for k in self.model_kwargs):
            raise rlrr.ConfigError(f"model kwargs must be a dict of argument names to values, got {self.model_kwargs!r}")
        if "num_classes" in self.model_kwargs:
            raise rlrr.ConfigError(f"give the class count as num_classes (--num-classes), not in the model kwargs: {self.model_kwargs['num_classes']!r}")
        loading = sorted(LOADING_KWARGS & set(self.model_kwargs))
        if loading:
            raise rlrr.ConfigError(f"model kwargs {loading} would load weights or download: base weights come only from a local file (--weights)")
        if self.weights is not None:
            check_path(self.weights, "weights", zoo.WeightsFileError)
        if self.preset is not None and not isinstance(self.preset, str):
            raise rlrr.ConfigError(f"preset must be a zoo preset name, got {self.preset!r}")
        if not isinstance(self.tiny, bool):
            raise rlrr.ConfigError(f"tiny must be True or False, got {self.tiny!r}")


DEFAULT_SPEC = ModelSpec("vit_tiny_patch16_224", num_classes=10, img_size=224)


def resolve_spec(
    name: str | None = None,
    *,
    adapter: str | os.PathLike | None = None,
    num_classes: int | None = None,
    img_size: int | tuple[int, int] | None = None,
    model_kwargs: dict | None = None,
    weights: str | os.PathLike | None = None,
) -> ModelSpec:
    """The model to build: what the adapter file says (its metadata), overridden by the arguments.

    A name that contradicts the adapter file's raises AdapterMismatchError; no name and no file
    gives the built-in demo (`DEFAULT_SPEC`). An adapter file may name a timm or torchvision
    model or a zoo preset, never a `package.module:function` builder: a file cannot make the
    exporter import code (pass that name yourself).
    """
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise rlrr.ConfigError(f"--model must be a model name such as 'resnet50', got {name!r}")
    if adapter is not None:
        adapter = input_file(adapter, "adapter", rlrr.AdapterFileError)
    meta = read_metadata(adapter) if adapter is not None else {}
    if name and meta.get("model") and _plain(name) != _plain(meta["model"]):
        raise rlrr.AdapterMismatchError(f"--model {name!r} but the adapter file {adapter} was made for {meta['model']!r}; drop --model or use the matching adapter")
    if adapter is not None and not name and not meta.get("model"):
        raise rlrr.ConfigError(f"the adapter file {adapter} does not say which model it was made for (no 'model' in its metadata): pass --model")
    if not name and meta.get("model") and not meta.get("preset") and _builder(meta["model"]):
        raise rlrr.ConfigError(f"the adapter file {adapter} names the Python builder {meta['model']!r} as its model; an adapter file cannot make "
                               f"the exporter import code: pass --model {meta['model']} yourself if you trust it")
    if not name and adapter is None:
        default = DEFAULT_SPEC
        return ModelSpec(default.name, default.num_classes if num_classes is None else num_classes,
                         default.img_size if img_size is None else img_size, dict(model_kwargs or {}), weights)
    kwargs = {**meta.get("model_kwargs", {}), **(model_kwargs or {})}
    try:
        return ModelSpec(name or meta["model"], num_classes if num_classes is not None else meta.get("num_classes"),
                         img_size if img_size is not None else _size(meta.get("img_size")), kwargs, weights, meta.get("preset"), meta.get("tiny", False))
    except rlrr.ConfigError as e:
        if not meta:
            raise
        raise rlrr.ConfigError(f"{e} (from the options and the adapter file {adapter}'s metadata)") from None


def _builder(name: str) -> bool:
    """A `package.module:function` name (imports code), not a library name with a prefix."""
    prefix, sep, _ = name.partition(":")
    return bool(sep) and prefix not in ("timm", "torchvision", "tv")


def _plain(name: str) -> str:
    prefix, sep, rest = name.partition(":")
    return rest if sep and prefix in ("timm", "torchvision", "tv") else name


def _size(value) -> int | tuple[int, int] | None:
    return tuple(value) if isinstance(value, list) else value


class Runner(Protocol):
    """A reloaded export: runs a batch and says what runs it."""

    providers: list[str]
    note: str

    def run(self, x: Tensor) -> list: ...


class Exporter(Protocol):
    """How one format writes, checks and reloads a model."""

    tool: str
    format: str
    suffix: str  # of the file it writes, for messages ("model.onnx")

    def options(self) -> dict: ...

    def require_runtime(self) -> None: ...

    def companions(self, out: Path) -> list[Path]: ...

    def export(self, model: nn.Module, example: Tensor, path: Path, output_names: list[str]) -> list[Path]: ...

    def check(self, path: Path) -> None: ...

    def load(self, path: Path) -> Runner: ...


class Steps:
    """Numbered steps, timed, announced through `progress`."""

    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress, self.total, self.done = progress, total, 0
        self.timings: dict[str, float] = {}

    @contextmanager
    def __call__(self, label: str) -> Iterator[None]:
        self.done += 1
        text = f"[{self.done}/{self.total}] {label}"
        if self.progress:
            self.progress(text, None)
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        self.timings[label] = round(seconds, 3)
        if self.progress:
            self.progress(text, seconds)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _adapter_count(model: nn.Module) -> int:
    return sum(p.numel() for a in rlrr.adapters_of(model) for p in a.parameters(recurse=False))


def _ours(filename: str) -> bool:
    root = Path(__file__).resolve().parent.parent
    try:
        Path(filename).resolve().relative_to(root)
    except ValueError:
        return False
    return "site-packages" not in filename


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for dist in ("torch", "timm", "torchvision", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def run_export(
    model: nn.Module | ModelSpec | str | None,
    out: str | os.PathLike,
    exporter: Exporter,
    *,
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
    progress: Progress | None = None,
    info: ModelInfo | None = None,
) -> ExportReport:
    """Fold and export `model`, verify the file against the unmerged model, and write the report.

    `model` is a module (never changed: a copy is adapted and folded), a `ModelSpec`, a name
    (`ModelSpec(name)`), or None (the model the adapter file names). The adapter comes from `adapter` (a file from
    `rlrr.save_adapter`), else from the model if it is already adapted, else it is a seeded
    random one (said in the report). Writes `out` (and `out.json`, the report) atomically, only
    when verification passed or `keep_on_fail`; raises VerificationError (with the report) when
    outputs differ past `tolerance`. See `export.onnx.export_onnx` for the options.
    """
    batch_sizes, tolerance = check_options(dtype=dtype, dtypes=tuple(DTYPES), batch_sizes=batch_sizes, inputs_per_batch=inputs_per_batch, seed=seed, rank=rank,
                                           tolerance=tolerance, latency_runs=latency_runs, warmup=warmup)
    if adapter is not None:
        adapter = input_file(adapter, "adapter", rlrr.AdapterFileError)
    if input_shape is not None:
        input_shape = check_shape(input_shape)
    spec = resolve_spec(model, adapter=adapter) if model is None or isinstance(model, str) else model if isinstance(model, ModelSpec) else None
    if spec is not None and spec.weights is not None:
        input_file(spec.weights, "weights", zoo.WeightsFileError)
    out = output_path(out, exporter.suffix)
    staging = Staging(out, companions=[report_path(out), *exporter.companions(out)], inputs=[adapter, spec.weights if spec else None],
                      force=force, suffix=exporter.suffix)
    with staging, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if verify:
            exporter.require_runtime()
        adapted = spec is None and bool(rlrr.adapters_of(model))
        timed = verify and latency_runs > 0 and not adapted
        steps = Steps(progress, 5 + (spec is not None) + timed + verify + (verify and latency_runs > 0))
        if spec is not None:
            with steps(f"building {spec.name}" + (f" and loading {spec.weights}" if spec.weights else "")):
                model, info = _build(spec, seed)
        else:
            info = info or ModelInfo(name=type(model).__name__)
        shape = input_shape or zoo.input_size(model, *((spec.img_size, spec.model_kwargs) if spec else ()))
        check_budget(shape, batch_sizes, inputs_per_batch if verify else 0)
        run = _Run(model.eval(), exporter, staging, shape, DTYPES[dtype], seed)
        base_params = None if adapted else _count(model)
        base = model if timed else None  # kept plain for its own export
        if spec is None or timed:  # the caller's module is never changed; the base stays plain
            run.model = copy.deepcopy(model)

        with steps("adapter: " + (f"loading {adapter}" if adapter else "the model's own" if adapted else f"seeded random (seed {seed}, rank {rank})")):
            ainfo = _adapt(run.model, adapter, adapted, seed, rank)
        if timed:
            with steps(f"exporting the base model (for the latency comparison) to {exporter.format}"):
                base_path = run.export(base, "base." + out.name)[0]
        del base
        adapter_params, adapted_params = _adapter_count(run.model), _count(run.model)

        inputs = make_inputs(shape, batch_sizes, inputs_per_batch, seed) if verify else []
        with steps(f"reference outputs of the unmerged model ({len(inputs)} inputs)"):
            expected = _forward(lambda: reference_outputs(run.model, inputs), f"running the adapted model on the {len(inputs)} verification inputs")
        for name in sample_independent(expected, run.names):
            warnings.warn(f"output {name!r} of the unmerged model is the same for every input sample, so the check cannot see "
                          "the weights through it (a zero-initialised head? load trained weights)", VacuousCheckWarning, stacklevel=1)
        with steps("folding the adapters into the weights (Eq. 20)"):
            _, fold_report = fold_with_report(run.model)
            run.model.to(run.dtype).eval()
            created = sum(run.model.get_parameter(n).numel() for n in fold_report.created)
        with steps(f"exporting the folded model to {exporter.format}"):
            files = run.export(run.model, out.name)
        with steps(f"checking the {exporter.format} file"):
            exporter.check(files[0])

        report = ExportReport(
            tool=exporter.tool, format=exporter.format, out=str(out), model=_model_dict(info), adapter=_adapter_dict(ainfo),
            input_shape=list(shape), dtype=dtype, batch_sizes=batch_sizes, inputs_per_batch=inputs_per_batch, seed=seed,
            tolerance=tolerance, options=exporter.options(), versions=_versions(),
            parameters={"base": adapted_params - adapter_params if base_params is None else base_params, "adapter": adapter_params,
                        "adapted": adapted_params, "folded": _count(run.model), "created": created},
            files=[str(out.with_name(f.name)) for f in files], size_bytes=sum(f.stat().st_size for f in files),
        )
        if verify:
            with steps(f"verifying against the unmerged model at batch {', '.join(map(str, batch_sizes))}"):
                runner = exporter.load(files[0])
                report.runtime = {"providers": runner.providers, "note": runner.note}
                report.outputs = compare(expected, [runner.run(run.cast(x)) for x in inputs], run.names)
                report.passed = all(o.passed(tolerance) for o in report.outputs)
            if latency_runs > 0:
                with steps(f"latency, folded vs base ({latency_runs} runs after {warmup} warm-up)"):
                    report.latency = _latency(exporter, runner, base_path if timed else None, run, max(batch_sizes), warmup, latency_runs)
        report.timings = {**steps.timings, "total": round(sum(steps.timings.values()), 3)}
        report.warnings = [f"{w.category.__name__}: {w.message}" for w in caught if _ours(w.filename)] + [f"base weights: {n}" for n in info.notes]
        report.kept = report.passed is not False or keep_on_fail
        if report.kept:
            staged_json = staging.write_text(out.name + ".json", report.to_json())
            staging.commit([*[(f, out.with_name(f.name)) for f in reversed(files)], (staged_json, report_path(out))])
    if report.passed is False:
        worst = max(report.outputs, key=lambda o: o.max_rel)
        raise VerificationError(
            f"{exporter.format} output {worst.name!r} differs from the unmerged model: max rel error {worst.max_rel:.3e} "
            f"(max abs {worst.max_abs:.3e}) > tolerance {tolerance:.1e}" + ("; file kept (keep_on_fail)" if report.kept else "; nothing written"),
            report,
        )
    return report


def _forward(run: Callable[[], object], doing: str):
    """Run the model; its failure on the export's inputs is the model's or the options' (image size), not a bug here."""
    try:
        return run()
    except rlrr.RLRRError:
        raise
    except Exception as e:
        raise refusal(e, doing) or ModelError(f"{doing} failed: {type(e).__name__}: {_first_line(e)} (check --img-size and the model's arguments)") from e


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else "")[:500]


class _Run:
    """What the steps share: the model being exported, where files go, the example input."""

    def __init__(self, model: nn.Module, exporter: Exporter, staging: Staging, shape: tuple, dtype: torch.dtype, seed: int) -> None:
        self.model, self.exporter, self.staging, self.shape, self.dtype, self.seed = model, exporter, staging, shape, dtype, seed
        self.device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.example = make_inputs(shape, [2], 1, seed + 7)[0]  # batch 2: an example batch of 1 gets specialised
        own = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        with torch.no_grad():
            n = len(flatten(_forward(lambda: model(self.example.to(self.device, own)), f"running the model on an input of shape {(2, *shape)}")))
        self.names = ["output"] if n == 1 else [f"output{i}" for i in range(n)]

    def cast(self, x: Tensor) -> Tensor:
        return x.to(self.device, self.dtype)

    def export(self, model: nn.Module, name: str) -> list[Path]:
        if next(model.parameters()).dtype != self.dtype:
            model = model.to(self.dtype)
        return self.exporter.export(model, self.cast(self.example), self.staging.path(name), self.names)


def _build(spec: ModelSpec, seed: int) -> tuple[nn.Module, ModelInfo]:
    """Build the base model; its random initialisation is seeded by `seed`, the caller's RNG untouched."""
    state = zoo.read_state_dict(spec.weights) if spec.weights else None  # an unreadable file fails before the build
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if spec.preset:
                model, info = _build_preset(spec)
            else:
                model, source = zoo.build_model(spec.name, num_classes=spec.num_classes, img_size=spec.img_size, model_kwargs=spec.model_kwargs)
                info = ModelInfo(name=spec.name, source=source.library, weights="random init", kwargs=source.kwargs)
    except rlrr.RLRRError:
        raise
    except Exception as e:  # a builder failing on the arguments given (embed_dim 0 ...): the arguments' fault
        raise refusal(e, f"building {spec.name}") or ModelError(f"building model {spec.name!r} with {spec.model_kwargs} failed: "
                                                                f"{type(e).__name__}: {_first_line(e)}") from e
    if state is not None:
        info.weights = str(spec.weights)
        with warnings.catch_warnings(record=True) as said:  # a head kept as built: a note of the report
            warnings.simplefilter("always")
            zoo.load_into(model, state, source=str(spec.weights))
        info.notes += [str(w.message) for w in said]
    else:
        woken = wake(model, seed)
        info.weights = f"random init, seed {seed}" + (f" ({len(woken)} constant tensors such as zero-init gammas redrawn)" if woken else "")
    return model, info


def _build_preset(spec: ModelSpec) -> tuple[nn.Module, ModelInfo]:
    """The zoo preset an adapter file was trained on (torchvision ResNets, test-size twins)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", zoo.RandomWeightsWarning)  # the report says how weights were made
        model = zoo.build_base(spec.preset, spec.num_classes, img_size=spec.img_size, tiny=spec.tiny, **spec.model_kwargs)
    return model.eval(), ModelInfo(name=spec.name, source=f"zoo preset {spec.preset}" + (" (test-size twin)" if spec.tiny else ""), kwargs=dict(spec.model_kwargs))


def _adapt(model: nn.Module, adapter, adapted: bool, seed: int, rank: int) -> AdapterInfo:
    if adapter is not None:
        head = zoo.classifier_name(model)
        rlrr.load_adapter(model, adapter, trainable=[head] if head else [])
        info = AdapterInfo("file", f"adapter file {adapter}")
    elif adapted:
        info = AdapterInfo("model", "adapters already in the model")
    else:
        random_adapter(model, seed=seed, rank=rank)
        info = AdapterInfo("random", describe_random(seed, rank))
    adapters = rlrr.adapters_of(model)
    info.sites, info.config = len(adapters), adapters[0].config.to_dict()
    model.eval()
    return info


def _latency(exporter: Exporter, runner: Runner, base_path: Path | None, run: _Run, batch: int, warmup: int, runs: int) -> Latency:
    x = run.cast(make_inputs(run.shape, [batch], 1, run.seed + 11)[0])
    lat = Latency(batch=batch, warmup=warmup, runs=runs)
    if base_path is None:
        lat.folded_ms = median_latency(lambda: runner.run(x), warmup, runs)
        lat.note = "no base export to compare with (the model came already adapted)"
        return lat
    base = exporter.load(base_path)
    lat.base_ms, lat.folded_ms = paired_latency(lambda: base.run(x), lambda: runner.run(x), warmup, runs)
    lat.note = f"same runtime and options ({', '.join(runner.providers)})"
    return lat


def _model_dict(info: ModelInfo) -> dict:
    return {"name": info.name, "source": info.source, "weights": info.weights, "kwargs": _jsonable(info.kwargs), "notes": info.notes}


def _adapter_dict(info: AdapterInfo) -> dict:
    return {"origin": info.origin, "description": info.description, "sites": info.sites, "config": info.config}


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)
