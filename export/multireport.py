"""The report of a multi-task export: the tasks, each verified on its own rows, sizes and latency."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from export.report import Latency, _finite, _size


@dataclass
class TaskCheck:
    """One task of a multi-task file and how its rows compared with its own unmerged model."""

    name: str
    index: int  # the value of the `task` input that selects it (routed), its position in --adapter order
    classes: int
    file: str  # the adapter file it came from
    onnx_adapter: str | None = None  # per-run mode: the .onnx_adapter file that selects it
    adapter_bytes: int = 0  # its adapter tensors (float32), head excluded
    head_bytes: int = 0  # its head
    rows: int = 0  # batch rows checked
    max_abs: float = 0.0
    max_rel: float = 0.0  # max |got - expected| / max |expected| over its own columns, per input, worst
    padding_ok: bool = True  # the columns past its class count are -inf (routed)
    finite: bool = True

    def passed(self, tolerance: float) -> bool:
        return self.finite and self.padding_ok and self.max_rel <= tolerance


@dataclass
class MultiTaskReport:
    """Everything a multi-task export did and measured. `passed` is None when verification was off."""

    tool: str
    mode: str  # "routed" (a `task` input picks each row's task) or "adapter inputs" (one task per run)
    out: str
    model: dict
    tasks: list[TaskCheck]
    config: dict
    input_shape: list[int]
    batch_sizes: list[int]
    inputs_per_batch: int
    seed: int
    tolerance: float
    inputs: list[dict] = field(default_factory=list)  # the graph's inputs: name, shape, what
    options: dict = field(default_factory=dict)
    runtime: dict = field(default_factory=dict)
    defaults: TaskCheck | None = None  # adapter-inputs mode: a run with no adapter (the base model, task 0's head)
    parameters: dict = field(default_factory=dict)  # base, per-task adapter and head
    files: list[str] = field(default_factory=list)
    size_bytes: int = 0  # the model file (and its data file)
    sizes: dict = field(default_factory=dict)  # bytes: base weights, adapters, heads; the 5 % budget
    latency: Latency | None = None
    timings: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    versions: dict = field(default_factory=dict)
    passed: bool | None = None
    kept: bool = True

    @property
    def verified(self) -> bool:
        return self.passed is not None

    def to_dict(self) -> dict:
        data = asdict(self)
        if self.latency is not None:
            data["latency"]["ratio"] = self.latency.ratio
        data["verified"] = self.verified
        return data

    def to_json(self) -> str:
        return json.dumps(_finite(self.to_dict()), indent=2)

    def table(self) -> str:
        routed = self.mode == "routed"
        lines = [
            f"{self.tool}: {len(self.tasks)} tasks on {self.model.get('name')} ({self.model.get('source')}), "
            f"{'routed per sample' if routed else 'adapter inputs, one task per run'}  ->  {self.out}",
            f"  base weights : {self.model.get('weights')}",
            f"  adapters     : rank {self.config.get('rank')}, {len(self.tasks)} files, same sites and options",
            "  inputs       : " + "; ".join(f"{i['name']} {i['shape']}" for i in self.inputs if not i["name"].startswith(("adapter.", "trained.")))
            + ("" if routed else f"; {sum(1 for i in self.inputs if i['name'].startswith(('adapter.', 'trained.')))} adapter/head inputs with defaults"),
            f"  checked      : batch {', '.join(map(str, self.batch_sizes))}, {self.inputs_per_batch} seeded input(s) each (seed {self.seed})"
            + (", tasks drawn per row" if routed else ", each task on every row"),
        ]
        if self.options:
            lines.append("  export       : " + ", ".join(f"{k} {v}" for k, v in self.options.items()))
        if self.runtime:
            lines.append(f"  runtime      : {', '.join(self.runtime.get('providers', [])) or '-'} ({self.runtime.get('note', '')})")
        s = self.sizes
        lines.append(f"  file         : {', '.join(self.files) or self.out} ({_size(self.size_bytes)}); base weights {_size(s.get('base', 0))}, "
                     f"adapters {_size(s.get('adapters', 0))}, heads {_size(s.get('heads', 0))}" + ("" if self.kept else " [removed]"))
        head = f"  {'task':<18} {'index':>5} {'classes':>7} {'rows':>5} {'max abs err':>12} {'max rel err':>12}  result  file"
        lines += ["", head]
        rows = list(self.tasks) + ([self.defaults] if self.defaults is not None else [])
        for t in rows:
            ok = "-" if not self.verified else "pass" if t.passed(self.tolerance) else "FAIL"
            where = t.file + (f" -> {t.onnx_adapter}" if t.onnx_adapter else "")
            sizes = f" (adapter {_size(t.adapter_bytes)}, head {_size(t.head_bytes)})" if t.onnx_adapter else ""
            index = str(t.index) if t.index >= 0 else "-"
            lines.append(f"  {t.name:<18} {index:>5} {t.classes:>7} {t.rows:>5} {t.max_abs:>12.3e} {t.max_rel:>12.3e}  {ok:<6}  {where}{sizes}"
                         + ("" if t.padding_ok else "  [padding columns not -inf]"))
        if self.verified:
            lines.append(f"  (rel err = max |onnx - the task's unmerged model| / max |unmerged| over the task's own columns, worst input; "
                         f"tolerance {self.tolerance:.1e}" + ("; columns past a task's classes must be -inf)" if routed else ")"))
        else:
            lines.append("  NOT VERIFIED (verification switched off)")
        if self.latency is not None and self.latency.ratio is not None:
            lat = self.latency
            lines += ["", f"  latency      : base {lat.base_ms:.2f} ms, {'routed' if routed else 'with an adapter'} {lat.folded_ms:.2f} ms, "
                          f"ratio {lat.ratio:.3f} (median of {lat.runs} runs after {lat.warmup} warm-up, batch {lat.batch}; {lat.note})"]
        if self.timings.get("total") is not None:
            lines.append(f"  wall time    : {self.timings['total']:.1f} s")
        for w in self.warnings:
            lines.append(f"  warning      : {w}")
        verdict = {True: "PASSED", False: "FAILED: a task's rows differ past tolerance", None: "exported (not verified)"}[self.passed]
        lines += ["", f"  {verdict}"]
        return "\n".join(lines)
