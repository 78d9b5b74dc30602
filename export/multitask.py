"""Several tasks of one base model in one ONNX file: `python -m export.onnx --adapter A --adapter B ...`.

    python -m export.onnx --weights base.pth --adapter cars=cars.safetensors --adapter pets.safetensors --out multi.onnx
    python -m export.onnx --weights base.pth --adapter cars.safetensors --adapter pets.safetensors --adapter-inputs --out multi.onnx

Routed (the default): one file with inputs `input` (N, C, H, W) and `task` (N,) int64, the task
of each row as its index in `--adapter` order, and one output (N, max classes) whose columns past
a row's class count are -inf. The base weights are stored once, each task's adapter vectors and
head once (`rlrr.TaskRouter`, exported as it is). Adapter inputs (`--adapter-inputs`): a base
file with no `task` input whose adapter tensors and head are graph inputs with defaults (identity
adapters, i.e. the base model, and the first task's head), and one `<out stem>.<task>.onnx_adapter`
per task for onnxruntime's `LoraAdapter` (export/onnx_serving.py).

Every adapter file is read with `rlrr.read_adapter_file` and checked against the others before
anything is built: one base model (model, preset, input size, builder arguments, base weights),
the same RLRR options and sites, unique task names. The check runs each task's rows against that
task's own unmerged model (the base model with its adapter and head loaded), at each batch size.
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

import rlrr
import zoo
from export.errors import VerificationError
from export.files import Staging, data_path, report_path
from export.multireport import MultiTaskReport, TaskCheck
from export.onnx import PROTOBUF_LIMIT, _MARGIN, OnnxExporter, model_bytes
from export.onnx_serving import AdapterRunner, RoutedRunner, WithAdapterInputs, add_defaults, graph_inputs, mark_routed, torch_export, write_onnx_adapter
from export.pipeline import ModelSpec, Steps, _build, _model_dict, _ours, _versions, resolve_spec
from export.report import Latency
from export.verify import DEFAULT_TOLERANCE, make_inputs, paired_latency

BASE_KEYS = ("model", "preset", "tiny", "img_size", "model_kwargs", "weights")  # metadata that names the base model


@dataclass
class Task:
    """One adapter file as a task: its name, where it came from, its validated state."""

    name: str
    path: Path
    state: rlrr.AdapterSet

    @property
    def meta(self) -> dict:
        return self.state.metadata


def split_spec(spec: str) -> tuple[str | None, str]:
    """`NAME=PATH` -> (NAME, PATH) when the text before the first '=' is a valid adapter name, else (None, spec)."""
    name, sep, rest = spec.partition("=")
    if not sep or not rest or Path(spec).is_file() and not Path(rest).is_file():
        return None, spec
    try:
        rlrr.check_adapter_name(name, ())
    except rlrr.ConfigError:
        return None, spec
    return name, rest


def _name_from(state: rlrr.AdapterSet, path: Path) -> str:
    meta = state.metadata
    finetune = meta.get("finetune") if isinstance(meta.get("finetune"), dict) else {}
    for candidate in (meta.get("task"), finetune.get("dataset")):
        if isinstance(candidate, str):
            try:
                return rlrr.check_adapter_name(candidate, ())
            except rlrr.ConfigError:
                pass
    return path.stem


def read_tasks(specs: Sequence[str]) -> list[Task]:
    """The tasks `--adapter` names, each file read and validated; names unique regardless of case."""
    tasks: list[Task] = []
    for spec in specs:
        name, path = split_spec(str(spec))
        state = rlrr.read_adapter_file(path)
        name = name or _name_from(state, Path(path))
        clash = next((t for t in tasks if t.name.lower() == name.lower()), None)
        if clash is not None:
            raise rlrr.ConfigError(f"two tasks are named {name!r} ({clash.path} and {path}): name them, "
                                   f"e.g. --adapter {name}_a={clash.path} --adapter {name}_b={path}")
        try:
            rlrr.check_adapter_name(name, ())
        except rlrr.ConfigError as e:
            raise rlrr.ConfigError(f"{path}: cannot name its task {name!r} ({e}); name it: --adapter NAME={path}") from None
        tasks.append(Task(name, Path(path), state))
    return tasks


def check_tasks(tasks: Sequence[Task]) -> None:
    """One base model, the same RLRR options and sites: else AdapterMismatchError naming the difference."""
    first = tasks[0]
    for task in tasks[1:]:
        for key in BASE_KEYS:
            a, b = first.meta.get(key), task.meta.get(key)
            if key == "model" and isinstance(a, str) and isinstance(b, str):
                a, b = a.split(":")[-1], b.split(":")[-1]
            if a is not None and b is not None and a != b:
                raise rlrr.AdapterMismatchError(f"adapter files for different base models: {task.path} has {key} {b!r}, "
                                                f"{first.path} has {a!r}; one multi-task file serves one base model")
    rlrr.check_same_placement([t.state for t in tasks], [str(t.path) for t in tasks])


def _assignments(batch_sizes: Sequence[int], per_batch: int, k: int, seed: int) -> list[Tensor]:
    """Seeded task indices for each input: every task appears as soon as the rows allow."""
    out = []
    for i, b in enumerate(batch_sizes):
        for j in range(per_batch):
            g = torch.Generator().manual_seed(seed * 1000 + i * 100 + j + 17)
            rows = (torch.arange(b) + (i * per_batch + j) * b) % k
            out.append(rows[torch.randperm(b, generator=g)])
    return out


def _with_head(model: nn.Module, head: str, classes: int) -> nn.Module:
    """The model with a fresh head of `classes` outputs where its own has another count."""
    parent, _, attr = head.rpartition(".")
    old = model.get_submodule(head)
    if old.out_features != classes:
        p = old.weight
        setattr(model.get_submodule(parent), attr, nn.Linear(old.in_features, classes, bias=old.bias is not None, device=p.device, dtype=p.dtype))
    return model


def _task_model(base: nn.Module, head: str, task: Task, classes: int) -> nn.Module:
    """The task's unmerged model: the base model with its head's size, the adapter file loaded."""
    model = _with_head(copy.deepcopy(base), head, classes)
    rlrr.load_adapter(model, task.path, trainable=[head])
    return model.eval()


def _classes(task: Task, head: str, base: nn.Module) -> int:
    weight = task.state.trained.get(f"{head}.weight")
    return int(weight.shape[0]) if weight is not None else base.get_submodule(head).out_features


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * 4 for t in tensors)  # float32 in the files


def export_multitask(
    adapters: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    exporter: OnnxExporter | None = None,
    *,
    spec: ModelSpec | None = None,
    weights: str | os.PathLike | None = None,
    adapter_inputs: bool = False,
    batch_sizes: Sequence[int] = (1, 4),
    inputs_per_batch: int = 3,
    seed: int = 0,
    tolerance: float | None = None,
    verify: bool = True,
    latency_runs: int = 20,
    warmup: int = 3,
    force: bool = False,
    keep_on_fail: bool = False,
    progress=None,
) -> MultiTaskReport:
    """Export the tasks of `adapters` (paths, or NAME=PATH) as one routed file, or a base file with adapter inputs.

    `spec`: the base model (default: what the first adapter file names, with `weights`; its
    class count is the first task's). `exporter`: opset, provider, external data (default
    `OnnxExporter()`). Other options as `export.onnx.export_onnx`. Raises AdapterMismatchError/ConfigError
    before anything is built when the files do not belong together, VerificationError (with the
    report) when a task's rows differ past `tolerance`.
    """
    tasks = read_tasks([str(a) for a in adapters])
    if not tasks:
        raise rlrr.ConfigError("a multi-task file needs at least one adapter file")
    check_tasks(tasks)
    spec = spec or resolve_spec(adapter=tasks[0].path, weights=weights)
    exporter = exporter or OnnxExporter()
    tolerance = DEFAULT_TOLERANCE["fp32"] if tolerance is None else float(tolerance)
    batch_sizes = [int(b) for b in batch_sizes]
    out = Path(out)
    onnx_adapters = [out.with_name(f"{out.stem}.{t.name}.onnx_adapter") for t in tasks] if adapter_inputs else []
    inputs = [t.path for t in tasks] + [spec.weights]
    staging = Staging(out, companions=[report_path(out), data_path(out), *onnx_adapters], inputs=inputs, force=force)
    with staging, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if verify:
            exporter.require_runtime()
        timed = verify and latency_runs > 0
        steps = Steps(progress, 4 + 2 * verify + timed + adapter_inputs)
        with steps(f"building {spec.name}" + (f" and loading {spec.weights}" if spec.weights else "")):
            base, info = _build(spec, seed)
            base = base.float().eval()
        head = zoo.classifier_name(base)
        if head is None or not isinstance(base.get_submodule(head), nn.Linear):
            raise rlrr.RoutingError(f"{spec.name} has no nn.Linear classifier head ({head!r}): each task needs its own head")
        classes = [_classes(t, head, base) for t in tasks]
        shape = zoo.input_size(base, spec.img_size, spec.model_kwargs)
        xs = make_inputs(shape, batch_sizes, inputs_per_batch, seed) if verify else []
        assigned = _assignments(batch_sizes, inputs_per_batch, len(tasks), seed) if verify else []

        with steps(f"reference outputs of each task's unmerged model ({len(tasks)} tasks)"):
            expected = _references(base, head, tasks, classes, xs, assigned, adapter_inputs)
        example = make_inputs(shape, [2], 1, seed + 7)[0]
        size = model_bytes(base) + sum(_tensor_bytes(t.state.tensors.values()) + _tensor_bytes(t.state.trained.values()) for t in tasks)
        external = exporter.external_data == "yes" or (exporter.external_data == "auto" and size > PROTOBUF_LIMIT - _MARGIN)
        meta = [{"name": t.name, "index": k, "classes": c, "file": str(t.path)} for k, (t, c) in enumerate(zip(tasks, classes))]
        path, staged_adapters = staging.path(out.name), []
        if adapter_inputs:
            with steps("exporting the base model with adapter inputs to ONNX"):
                files, defaults_name = _export_inputs(base, head, tasks[0], classes[0], example, path, exporter.opset, external, meta)
            with steps(f"writing {len(tasks)} .onnx_adapter files (onnxruntime.AdapterFormat)"):
                staged_adapters = _write_adapters(base, head, tasks, staging, onnx_adapters)
        else:
            with steps(f"exporting the routed model ({len(tasks)} tasks, a task input) to ONNX"):
                with rlrr.TaskRouter(base, [t.state for t in tasks], head=head, sources=[str(t.path) for t in tasks]) as router:
                    files = torch_export(router.eval(), (example, torch.tensor([0, len(tasks) - 1])), path,
                                         input_names=["input", "task"], output_names=["output"],
                                         dynamic_shapes=({0: torch.export.Dim("batch", min=1)},) * 2, opset=exporter.opset, external=external)
                mark_routed(path, meta, external)
        with steps("checking the ONNX file"):
            exporter.check(files[0])

        checks = [TaskCheck(t.name, k, c, str(t.path), adapter_bytes=_tensor_bytes(t.state.tensors.values()),
                            head_bytes=_tensor_bytes(t.state.trained.values())) for k, (t, c) in enumerate(zip(tasks, classes))]
        if adapter_inputs:
            for check, staged in zip(checks, onnx_adapters):
                check.onnx_adapter = str(staged)
        base_bytes = model_bytes(base) - _tensor_bytes(p for n, p in base.named_parameters() if n.startswith(head + "."))
        report = MultiTaskReport(
            tool="export.onnx", mode="adapter inputs" if adapter_inputs else "routed", out=str(out), model=_model_dict(info),
            tasks=checks, config=tasks[0].state.config.to_dict(), input_shape=list(shape), batch_sizes=batch_sizes,
            inputs_per_batch=inputs_per_batch, seed=seed, tolerance=tolerance, inputs=graph_inputs(files[0]),
            options={**exporter.options(), "external data": "yes" if external else "no"}, versions=_versions(),
            files=[str(out.with_name(f.name)) for f in files], size_bytes=sum(f.stat().st_size for f in files),
            sizes={"base": base_bytes, "adapters": sum(c.adapter_bytes for c in checks), "heads": sum(c.head_bytes for c in checks),
                   "onnx_adapters": [f.stat().st_size for f in staged_adapters] if adapter_inputs else []},
            parameters={"base": sum(p.numel() for p in base.parameters()), "adapter": [c.adapter_bytes // 4 for c in checks],
                        "head": [c.head_bytes // 4 for c in checks]},
        )
        if verify:
            with steps(f"verifying every task's rows against its unmerged model at batch {', '.join(map(str, batch_sizes))}"):
                if adapter_inputs:
                    runner = AdapterRunner(files[0], exporter.provider)
                    _verify_inputs(runner, report, staged_adapters, xs, expected, defaults_name)
                else:
                    runner = RoutedRunner(files[0], exporter.provider)
                    _verify_routed(runner, report, xs, assigned, expected)
                report.runtime = {"providers": runner.providers, "note": runner.note}
                report.passed = all(c.passed(tolerance) for c in report.tasks) and (report.defaults is None or report.defaults.passed(tolerance))
            if timed:
                with steps(f"latency against the base model's export ({latency_runs} runs after {warmup} warm-up)"):
                    report.latency = _latency(base, example, staging, exporter, runner, shape, max(batch_sizes), len(tasks),
                                              staged_adapters[0] if adapter_inputs else None, seed, warmup, latency_runs)
        report.timings = {**steps.timings, "total": round(sum(steps.timings.values()), 3)}
        report.warnings = [f"{w.category.__name__}: {w.message}" for w in caught if _ours(w.filename)] + [f"base weights: {n}" for n in info.notes]
        report.kept = report.passed is not False or keep_on_fail
        if report.kept:
            staged_json = staging.path(out.name + ".json")
            staged_json.write_text(report.to_json())
            moves = [(f, out.with_name(f.name)) for f in reversed(files)]
            if adapter_inputs:
                moves += list(zip(staged_adapters, onnx_adapters))
            staging.commit([*moves, (staged_json, report_path(out))])
    if report.passed is False:
        worst = max(report.tasks + ([report.defaults] if report.defaults else []), key=lambda c: (not c.passed(tolerance), c.max_rel))
        raise VerificationError(
            f"task {worst.name!r}: rows differ from its unmerged model: max rel error {worst.max_rel:.3e} (max abs {worst.max_abs:.3e}) "
            f"> tolerance {tolerance:.1e}" + ("" if worst.padding_ok else ", padding columns not -inf")
            + ("; files kept (keep_on_fail)" if report.kept else "; nothing written"), report)
    return report


@torch.no_grad()
def _references(base: nn.Module, head: str, tasks: Sequence[Task], classes: list[int], xs: list[Tensor], assigned: list[Tensor],
                adapter_inputs: bool) -> dict:
    """Each task's unmerged outputs: on its own rows (routed), or on every row (adapter inputs); plus the defaults."""
    expected: dict = {}
    for k, (task, c) in enumerate(zip(tasks, classes)):
        model = _task_model(base, head, task, c)
        for i, (x, a) in enumerate(zip(xs, assigned)):
            rows = torch.ones(x.shape[0], dtype=torch.bool) if adapter_inputs else a == k
            if rows.any():
                expected[(k, i)] = model(x[rows]).float()
        del model
    if adapter_inputs and xs:  # no adapter active: the base model with the first task's head
        model = _with_head(copy.deepcopy(base), head, classes[0])
        trained = tasks[0].state.trained
        with torch.no_grad():
            for name, p in model.get_submodule(head).named_parameters():
                if f"{head}.{name}" in trained:
                    p.copy_(trained[f"{head}.{name}"])
        for i, x in enumerate(xs):
            expected[("defaults", i)] = model(x).float()
    return expected


def _compare(check: TaskCheck, got: Tensor, exp: Tensor) -> None:
    check.rows += exp.shape[0]
    if not bool(torch.isfinite(got).all()):
        check.finite, check.max_abs, check.max_rel = False, float("inf"), float("inf")
        return
    diff = float((got.double() - exp.double()).abs().max())
    scale = float(exp.double().abs().max())
    check.max_abs = max(check.max_abs, diff)
    check.max_rel = max(check.max_rel, diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf")))


def _verify_routed(runner: RoutedRunner, report: MultiTaskReport, xs: list[Tensor], assigned: list[Tensor], expected: dict) -> None:
    width = max(c.classes for c in report.tasks)
    for i, (x, a) in enumerate(zip(xs, assigned)):
        got = torch.from_numpy(runner.run(x, a))
        if tuple(got.shape) != (x.shape[0], width):
            raise VerificationError(f"the routed model returns {tuple(got.shape)} for a batch of {x.shape[0]}, expected {(x.shape[0], width)}")
        for k, check in enumerate(report.tasks):
            rows = a == k
            if not rows.any():
                continue
            own = got[rows]
            _compare(check, own[:, : check.classes], expected[(k, i)])
            check.padding_ok &= bool((own[:, check.classes:] == float("-inf")).all())


def _verify_inputs(runner: AdapterRunner, report: MultiTaskReport, adapters: list[Path], xs: list[Tensor], expected: dict, defaults_name: str) -> None:
    for k, (check, adapter) in enumerate(zip(report.tasks, adapters)):
        for i, x in enumerate(xs):
            _compare(check, torch.from_numpy(runner.run(x, adapter)), expected[(k, i)])
    first = report.tasks[0]
    report.defaults = TaskCheck(defaults_name, -1, first.classes, "(no adapter active)")
    for i, x in enumerate(xs):
        _compare(report.defaults, torch.from_numpy(runner.run(x, None)), expected[("defaults", i)])


def _input_names(model: nn.Module, head: str) -> tuple[list[str], list[str]]:
    """(parameter names in `model`, graph input names): every adapter tensor, then the head's tensors."""
    fqn = {id(p): n for n, p in model.named_parameters()}
    params, names = [], []
    for adapter in rlrr.adapters_of(model):
        for pname, p in adapter.named_parameters(recurse=False):
            params.append(fqn[id(p)])
            names.append(f"adapter.{adapter.site.name}.{pname}")
    for pname, _ in model.get_submodule(head).named_parameters():
        params.append(f"{head}.{pname}")
        names.append(f"trained.{head}.{pname}")
    return params, names


def _per_run_model(base: nn.Module, head: str, task: Task, classes: int) -> nn.Module:
    """The unmerged model whose adapters sit at identity (the base model), with the first task's head."""
    model = _task_model(base, head, task, classes)
    with torch.no_grad():
        for adapter in rlrr.adapters_of(model):
            adapter.reset_parameters("identity")
    return model


def _export_inputs(base: nn.Module, head: str, first: Task, classes: int, example: Tensor, path: Path, opset: int, external: bool,
                   meta: list[dict]) -> tuple[list[Path], str]:
    model = _per_run_model(base, head, first, classes)
    params, names = _input_names(model, head)
    values = dict(model.named_parameters())
    defaults = [values[p].detach().clone() for p in params]
    classes_dim = torch.export.Dim("classes", min=1)
    dynamic = ({0: torch.export.Dim("batch", min=1)}, tuple({0: classes_dim} if n.startswith("trained.") else None for n in names))  # (x, *tensors)
    files = torch_export(WithAdapterInputs(model, params).eval(), (example, *defaults), path, input_names=["input", *names],
                         output_names=["output"], dynamic_shapes=dynamic, opset=opset, external=external)
    add_defaults(path, {n: v.numpy() for n, v in zip(names, defaults)}, meta, external)
    return files, f"(defaults: identity, {first.name}'s head)"


def _write_adapters(base: nn.Module, head: str, tasks: Sequence[Task], staging: Staging, finals: list[Path]) -> list[Path]:
    """One .onnx_adapter per task: its adapter tensors and its head (the model's where it has none)."""
    own = {f"{head}.{n}": p.detach() for n, p in base.get_submodule(head).named_parameters()}
    staged = []
    for task, final in zip(tasks, finals):
        tensors = {f"adapter.{k}": v.float().numpy() for k, v in task.state.tensors.items()}
        tensors |= {f"trained.{k}": task.state.trained.get(k, v).float().numpy() for k, v in own.items()}
        path = staging.path(final.name)
        write_onnx_adapter(path, tensors)
        staged.append(path)
    return staged


def _latency(base: nn.Module, example: Tensor, staging: Staging, exporter: OnnxExporter, runner, shape: tuple, batch: int, k: int,
             adapter: Path | None, seed: int, warmup: int, runs: int) -> Latency:
    """The multi-task file against the base model's own export, alternately, same runtime and options."""
    base_path = exporter.export(base, example, staging.path("base.onnx"), ["output"])[0]
    plain = exporter.load(base_path)
    x = make_inputs(shape, [batch], 1, seed + 11)[0]
    lat = Latency(batch=batch, warmup=warmup, runs=runs)
    if adapter is None:
        task = torch.arange(batch) % k
        run = lambda: runner.run(x, task)  # noqa: E731
        lat.note = f"a mixed batch over {k} tasks; {', '.join(runner.providers)}"
    else:
        run = lambda: runner.run(x, adapter)  # noqa: E731
        lat.note = f"one task's adapter active; {', '.join(runner.providers)}"
    lat.base_ms, lat.folded_ms = paired_latency(lambda: plain.run(x), run, warmup, runs)
    return lat


def run_many(args, exporter: OnnxExporter, progress) -> tuple[MultiTaskReport, Path]:
    """The CLI's multi-task path (`export.cli.run_cli` calls it for several --adapter or --adapter-inputs)."""
    if args.dtype != "fp32":
        raise rlrr.ConfigError(f"--dtype {args.dtype}: multi-task files are exported in fp32 only")
    if args.num_classes is not None:
        raise rlrr.ConfigError("--num-classes does not apply to a multi-task file: each task's head has its own class count")
    if args.rank != 1:
        raise rlrr.ConfigError("--rank sets a random adapter's rank; a multi-task file takes trained adapter files")
    tasks = read_tasks(args.adapter)  # early, for the default output name and the spec
    if not tasks or len(tasks) < 2 and not args.adapter_inputs:
        raise rlrr.ConfigError("--adapter-inputs needs an --adapter file" if not tasks else
                               "a routed multi-task file needs two or more --adapter files (one adapter folds into a plain file)")
    spec = resolve_spec(args.model, adapter=tasks[0].path, img_size=args.img_size, model_kwargs=args.model_kwargs, weights=args.weights)
    out = Path(args.out) if args.out else Path.cwd() / f"rlrr-{Path(spec.name.split(':')[-1]).name}-multi.onnx"
    started = time.perf_counter()
    report = export_multitask(args.adapter, out, exporter, spec=spec, adapter_inputs=args.adapter_inputs, batch_sizes=args.batch_sizes,
                           inputs_per_batch=args.inputs, seed=args.seed, tolerance=args.tolerance, verify=not args.no_verify,
                           latency_runs=args.latency_runs, warmup=args.warmup, force=args.force, keep_on_fail=args.keep_on_fail,
                           progress=progress)
    report.timings.setdefault("wall", round(time.perf_counter() - started, 3))
    return report, out
