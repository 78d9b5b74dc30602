"""The export report: one dataclass, printed as a table and written as JSON beside the model."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from export.verify import OutputCheck


@dataclass
class ModelInfo:
    """Where the exported base model came from, for the report."""

    name: str  # as asked, e.g. "vit_base_patch16_224" or "torchvision:resnet50"
    source: str = "module"  # "timm", "torchvision", "builder", "zoo preset ..." or "module" (given as an object)
    weights: str = "as given"  # a file path, or how the weights were made
    kwargs: dict = field(default_factory=dict)  # everything passed to the builder
    notes: list[str] = field(default_factory=list)  # what loading the base weights said (a head kept as built)


@dataclass
class Latency:
    """Median latency of the folded export against the base model's, same runtime and options."""

    batch: int
    warmup: int
    runs: int
    base_ms: float | None = None
    folded_ms: float | None = None
    note: str = ""
    reference: str = "base"  # what base_ms timed: the base model's export, or (INT8) the fp32 export of the folded model

    @property
    def ratio(self) -> float | None:
        if self.base_ms and self.folded_ms:
            return self.folded_ms / self.base_ms
        return None


@dataclass
class ExportReport:
    """Everything an export did and measured. `passed` is None when verification was switched off."""

    tool: str  # "export.onnx" or "export.torchscript"
    format: str  # "onnx", "torchscript" or "pt2"
    out: str
    model: dict
    adapter: dict
    input_shape: list[int]  # (C, H, W); the batch axis is dynamic
    dtype: str
    batch_sizes: list[int]
    inputs_per_batch: int
    seed: int
    tolerance: float
    options: dict = field(default_factory=dict)  # exporter options (opset, external data ...)
    runtime: dict = field(default_factory=dict)  # asked / providers / note
    outputs: list[OutputCheck] = field(default_factory=list)
    parameters: dict = field(default_factory=dict)  # base, adapter, adapted, folded, created
    files: list[str] = field(default_factory=list)
    size_bytes: int = 0
    latency: Latency | None = None
    timings: dict = field(default_factory=dict)  # step -> seconds
    warnings: list[str] = field(default_factory=list)
    versions: dict = field(default_factory=dict)
    passed: bool | None = None
    kept: bool = True  # False when a failed export was removed
    quantization: dict | None = None  # INT8: how (export.quantize), what calibrated, fp32 file size
    agreement: dict | None = None  # INT8: top-1 agreement with the unmerged fp32 model, logits' relative errors
    conditioning: dict | None = None  # a failed fp32 check: the model's own fp32-vs-fp64 error, the tolerance it allows
    divergence: list[dict] = field(default_factory=list)  # a failed check: modules past tolerance, in execution order
    localisation: dict | None = None  # how `divergence` was measured

    def first_divergence(self) -> str:
        """'first divergence: blocks.3.mlp.fc2, rel err 4.1e-02 (tolerance 1.0e-04)', or ''."""
        if not self.divergence:
            return ""
        d = self.divergence[0]
        return f"first divergence: {d['module']}, rel err {d['max_rel']:.1e} (tolerance {d['tolerance']:.1e})"

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
        """A readable report: what was exported, the errors against the unmerged model, cost."""
        p = self.parameters
        lines = [
            f"{self.tool}: {self.model.get('name')} ({self.model.get('source')})  ->  {self.out}",
            f"  base weights : {self.model.get('weights')}",
            f"  adapter      : {self.adapter.get('description')} ({self.adapter.get('sites', 0)} sites)",
            f"  input        : (N, {', '.join(map(str, self.input_shape))}) {self.dtype}, dynamic batch; "
            f"checked at batch {', '.join(map(str, self.batch_sizes))}, {self.inputs_per_batch} seeded input(s) each (seed {self.seed})"
            if self.dtype != "int8" else
            f"  input        : (N, {', '.join(map(str, self.input_shape))}) fp32 (int8 inside), dynamic batch; checked in batches of {max(self.batch_sizes)}",
        ]
        if self.options:
            lines.append("  export       : " + ", ".join(f"{k} {v}" for k, v in self.options.items()))
        if self.runtime:
            lines.append(f"  runtime      : {', '.join(self.runtime.get('providers', [])) or '-'} ({self.runtime.get('note', '')})")
        lines.append(f"  parameters   : base {p.get('base', 0):,} | adapted (unmerged) {p.get('adapted', 0):,} "
                     f"(+{p.get('adapter', 0):,} adapter) | folded {p.get('folded', 0):,}"
                     + (f" (+{p['created']:,} in biases a shift created)" if p.get("created") else ""))
        lines.append(f"  file         : {', '.join(self.files) or self.out} ({_size(self.size_bytes)})" + ("" if self.kept else " [removed]"))
        if self.quantization:
            q = self.quantization
            lines.append(f"  quantized    : {q['format']} {', '.join(q['ops'])}; weights {q['weights']}; activations {q['activations']}"
                         + (f"; kept in float: {', '.join(q['keep_fp32'])} ({q['nodes_kept_fp32']} nodes)" if q["keep_fp32"] else ""))
            lines.append(f"  calibration  : {q['calibration']}")
            ratio = self.size_bytes / q["fp32_size_bytes"] if q.get("fp32_size_bytes") else float("nan")
            lines.append(f"  size         : int8 {_size(self.size_bytes)}, fp32 export {_size(q.get('fp32_size_bytes', 0))}, int8/fp32 {ratio:.3f}")
        if self.verified and self.agreement is not None:
            a = self.agreement
            lines += ["", f"  agreement    : top-1 {a['top1']:.2%} ({a['agree']}/{a['samples']}) with the unmerged fp32 model, "
                          f"min {a['min_agreement']:.2%}: {'pass' if a['passed'] else 'FAIL'}"
                          + (f" (the fp32 model's top-1 takes {a['classes']} distinct class(es) on these inputs)" if "classes" in a else ""),
                      f"  logits       : relative error mean {a['mean_rel']:.3e}, max {a['max_rel']:.3e} (per sample, against its max |logit|)",
                      f"  checked on   : {self.quantization['checked_on'] if self.quantization else ''}"]
        elif self.verified:
            lines += ["", f"  {'output':<16} {'shape':<14} {'max abs err':>12} {'max rel err':>12} {'tolerance':>10}  result"]
            for o in self.outputs:
                ok = "pass" if o.passed(self.tolerance) else "FAIL"
                shape = "x".join(map(str, o.shape))
                lines.append(f"  {o.name:<16} {shape:<14} {o.max_abs:>12.3e} {o.max_rel:>12.3e} {self.tolerance:>10.1e}  {ok}")
            if self.conditioning:
                c = self.conditioning
                worst = max(c["fp32_vs_fp64"].values())
                lines.append(f"  (tolerance scaled to the model's own fp32 error: PyTorch float32 vs float64 {worst:.1e} x {c['factor']:g}, "
                             f"above the fixed {c['fixed_tolerance']:.1e})")
            lines.append("  (rel err = max |onnx - unmerged| / max |unmerged|, per output, worst input)" if self.format == "onnx"
                         else "  (rel err = max |exported - unmerged| / max |unmerged|, per output, worst input)")
        else:
            lines += ["", "  NOT VERIFIED (verification switched off)"]
        if self.latency is not None:
            lat = self.latency
            lines.append("")
            if lat.ratio is not None and lat.reference != "base":
                lines.append(f"  latency      : {lat.reference} {lat.base_ms:.2f} ms, {self.dtype} {lat.folded_ms:.2f} ms, {self.dtype}/fp32 {lat.ratio:.3f} "
                             f"(median of {lat.runs} runs after {lat.warmup} warm-up, batch {lat.batch})")
            elif lat.ratio is not None:
                lines.append(f"  latency      : base {lat.base_ms:.2f} ms, folded {lat.folded_ms:.2f} ms, folded/base {lat.ratio:.3f} "
                             f"(median of {lat.runs} runs after {lat.warmup} warm-up, batch {lat.batch})")
            elif lat.folded_ms is not None:
                lines.append(f"  latency      : folded {lat.folded_ms:.2f} ms (batch {lat.batch}); {lat.note}")
            else:
                lines.append(f"  latency      : {lat.note}")
        if self.timings:
            total = self.timings.get("total")
            lines.append(f"  wall time    : {total:.1f} s" if total is not None else "")
        for w in self.warnings:
            lines.append(f"  warning      : {w}")
        if self.divergence:
            lines.append(f"  {self.first_divergence()}"
                         + (f"; {len(self.divergence) - 1} more module(s) after it in the report's 'divergence'" if len(self.divergence) > 1 else ""))
            if self.dtype == "int8":
                lines.append(f"  (try --keep-fp32 {self.divergence[0]['module']}: that module then runs in float)")
        elif self.localisation and self.passed is False:
            largest = ", ".join(f"{d['module']} {d['max_rel']:.1e}" for d in self.localisation.get("largest", []))
            lines.append(f"  localisation : {self.localisation.get('note') or 'no module output departs past its tolerance; largest: ' + (largest or '-')}")
        failed = "FAILED: top-1 agreement below the minimum" if self.agreement is not None else "FAILED: outputs differ past tolerance"
        verdict = {True: "PASSED", False: failed, None: "exported (not verified)"}[self.passed]
        lines += ["", f"  {verdict}"]
        return "\n".join(line for line in lines)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _finite(value):
    """JSON has no inf/nan: write them as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
