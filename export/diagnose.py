"""After a failed check: is the miss the model's own fp32 arithmetic, and where does the export depart?

1. Conditioning (fp32 exports at the default tolerance): some models lose more digits to float32
   arithmetic than the fixed tolerance allows (visformer_tiny with random weights: attention logits
   in the thousands, a saturated softmax, PyTorch's own float32 output 4e-4 to 7e-3 from float64).
   No exporter can do better than float32 itself, so the check then passes within
   `CONDITIONING_FACTOR` times the model's own float32-vs-float64 error, and the report says so.
2. Localisation: the exported file's module outputs against the unmerged model's (captured before
   the fold for the first sample of each checked input, export.localize), on the captured sample
   whose output the export gets most wrong; the modules past tolerance, in execution order.
   For INT8 (decisions, not bits, pass or fail it) a module departs past the INT8 tolerance
   (`DEFAULT_TOLERANCE["int8"]`, or `--tolerance`): the first one is the module to try with `--keep-fp32`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from export.localize import capture, compare_modules, departures, relative_error
from export.verify import CONDITIONING_FACTOR, fp32_conditioning


def diagnose(report, model, exporter, path: Path, reference_path: Path, inputs: list[Tensor], expected: list, got: list,
             probes: dict[int, dict[str, Tensor]], *, fixed: bool, cast) -> None:
    """Fill `report.conditioning` (and re-judge `report.passed`), `report.divergence` and `report.localisation`."""
    module_conditioning: dict[str, float] = {}
    worst = max(probes, key=lambda i: relative_error(torch.as_tensor(np.asarray(got[i][0][:1])).float(), expected[i][0][:1])) if probes else None
    probe, captured = (inputs[worst][:1], probes[worst]) if worst is not None else (None, {})
    if report.dtype == "fp32" and fixed:
        own = fp32_conditioning(model, inputs)
        scaled = max(report.tolerance, CONDITIONING_FACTOR * max(own))
        report.conditioning = {
            "fp32_vs_fp64": {o.name: w for o, w in zip(report.outputs, own)}, "factor": CONDITIONING_FACTOR,
            "fixed_tolerance": report.tolerance, "tolerance": scaled,
            "note": "the folded model in PyTorch, float32 against float64 on the same inputs: what float32 arithmetic alone costs this model",
        }
        report.tolerance = scaled
        report.passed = all(o.passed(scaled) for o in report.outputs)
        if report.passed or probe is None:
            return
        module_conditioning = _module_conditioning(model, probe)
    if probe is None:
        return
    intermediates = getattr(exporter, "intermediates", None)
    values = intermediates(path, captured, cast(probe), reference=reference_path) if intermediates else {}
    if not values:
        report.localisation = {"note": f"{exporter.format} files do not show their module outputs: no localisation"}
        return
    errors = compare_modules(captured, values)
    def tolerance(module: str) -> float:
        return max(report.tolerance, CONDITIONING_FACTOR * module_conditioning.get(module, 0.0))

    report.divergence = [d.to_dict() for d in departures(errors, tolerance)]
    report.localisation = {
        "input": f"the first sample of checked input {worst} (of {len(probes)} captured, the one the export gets most wrong)",
        "modules_compared": len(errors),
        "measure": "max |exported - unmerged| / max |unmerged| of each module's output",
        "tolerance": report.tolerance,
        "scaled_by_conditioning": bool(module_conditioning),
        "largest": [{"module": m, "max_rel": e} for m, e in sorted(errors, key=lambda me: -me[1])[:3]],
    }


def _module_conditioning(model, probe: Tensor) -> dict[str, float]:
    """Each module output's float32-vs-float64 error on `probe` (the model converted in place and back)."""
    low = capture(model, probe)
    model.double()
    try:
        high = capture(model, probe.double())
    finally:
        model.float()
    return {m: relative_error(low[m], high[m]) for m in low if m in high and low[m].shape == high[m].shape}
