"""Numbers that say whether an exported model computes what the unmerged model computes.

Relative error is taken against the output's scale, max |expected|, not elementwise: an
elementwise ratio explodes on outputs near zero and means nothing there (design.md §5).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from export.errors import MissingRuntimeError, VerificationError

#: Max error relative to the output's scale. INT8 passes on top-1 agreement (export.quantize); its
#: tolerance is per module, for saying where a failed check departs: ordinary 8-bit rounding,
#: accumulated, stayed within 1-6 % of a module output's scale where measured (the 2-block test ViT at
#: most 3 %; with random weights ViT-B/16 4.5 %, Swin-B 5.8 %; docs/export.md).
DEFAULT_TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2, "int8": 0.1}
PROVIDERS = ("auto", "cuda", "cpu")
INSTALL_HINT = (
    "install one: pip install 'rlrr[cpu]' (onnxruntime) or pip install 'rlrr[gpu]' (onnxruntime-gpu, "
    "for a CUDA GPU; never both in one environment)"
)


def flatten(output) -> list[Tensor]:
    """The tensors of a model output (a tensor, or tuples/lists/dicts of them), in export order."""
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, dict):
        return [t for v in output.values() for t in flatten(v)]
    if isinstance(output, (tuple, list)):
        return [t for v in output for t in flatten(v)]
    return []


def make_inputs(shape: Sequence[int], batch_sizes: Sequence[int], per_batch: int, seed: int) -> list[Tensor]:
    """Seeded standard-normal inputs, `per_batch` of each batch size, float32 on the CPU."""
    out = []
    for i, b in enumerate(batch_sizes):
        for j in range(per_batch):
            g = torch.Generator().manual_seed(seed * 1000 + i * 100 + j)
            out.append(torch.randn((b, *shape), generator=g))
    return out


@torch.no_grad()
def reference_outputs(model: nn.Module, inputs: Sequence[Tensor]) -> list[list[Tensor]]:
    """The model's outputs in float32 on the CPU, one list of output tensors per input."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return [[t.detach().float().cpu() for t in flatten(model(x.to(device, dtype)))] for x in inputs]


def sample_independent(expected: Sequence[Sequence[Tensor]], names: Sequence[str]) -> list[str]:
    """Names of outputs that are identical for every input sample (all rows of every batch equal).

    Such an output (a zero-initialised head gives one: torchvision's ViT) hides any error in the
    weights, so a comparison through it passes whatever the export did.
    """
    found = []
    for i, name in enumerate(names):
        batches = [outputs[i] for outputs in expected]
        rows = [e.reshape(e.shape[0], -1) for e in batches if e.ndim >= 1 and e.numel()]
        if not rows or len({r.shape[1] for r in rows}) != 1:
            continue
        stacked = torch.cat(rows)
        if stacked.shape[0] >= 2 and bool((stacked == stacked[:1]).all()):
            found.append(name)
    return found


@dataclass
class OutputCheck:
    """Worst-case error of one output over every input checked."""

    name: str
    shape: list[int]  # of the first input's output
    max_abs: float = 0.0
    max_rel: float = 0.0  # max |got - expected| / max |expected|, per input, worst case
    scale: float = 0.0  # max |expected| seen
    finite: bool = True

    def passed(self, tolerance: float) -> bool:
        return self.finite and self.max_rel <= tolerance


def compare(expected: Sequence[Sequence[Tensor]], got: Sequence[Sequence[np.ndarray | Tensor]], names: Sequence[str]) -> list[OutputCheck]:
    """Per-output worst errors of `got` against `expected` (one list of outputs per input)."""
    results = [OutputCheck(n, list(expected[0][i].shape)) for i, n in enumerate(names)]
    for exp_outputs, got_outputs in zip(expected, got):
        if len(got_outputs) != len(exp_outputs):
            raise VerificationError(f"the exported model returns {len(got_outputs)} outputs, the PyTorch model {len(exp_outputs)}")
        for r, e, g in zip(results, exp_outputs, got_outputs):
            g = torch.as_tensor(np.asarray(g) if not isinstance(g, Tensor) else g).detach().float().cpu()
            if g.shape != e.shape:
                raise VerificationError(f"output {r.name}: exported shape {tuple(g.shape)}, PyTorch shape {tuple(e.shape)}")
            if not bool(torch.isfinite(g).all()):
                r.finite = False
                r.max_abs = r.max_rel = float("inf")
                continue
            diff = float((g.double() - e.double()).abs().max()) if e.numel() else 0.0
            scale = float(e.double().abs().max()) if e.numel() else 0.0
            r.scale = max(r.scale, scale)
            r.max_abs = max(r.max_abs, diff)
            r.max_rel = max(r.max_rel, diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf")))
    return results


def median_latency(run: Callable[[], object], warmup: int, runs: int) -> float:
    """Median wall time of `run()` in milliseconds after `warmup` untimed calls."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def paired_latency(base: Callable[[], object], folded: Callable[[], object], warmup: int, runs: int) -> tuple[float, float]:
    """Median ms of two callables, timed alternately so drift (turbo, other load) hits both."""
    for _ in range(warmup):
        base()
        folded()
    t_base, t_folded = [], []
    for _ in range(runs):
        for fn, times in ((base, t_base), (folded, t_folded)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(t_base), 1000 * statistics.median(t_folded)


# --- onnxruntime ------------------------------------------------------------------------


def import_onnxruntime():
    """The onnxruntime module, or MissingRuntimeError saying how to install it."""
    try:
        import onnxruntime
    except ImportError as e:
        raise MissingRuntimeError(
            f"onnxruntime is not installed, so the exported model cannot be verified: {INSTALL_HINT}; "
            "or export without checking: --no-verify (verify=False)"
        ) from e
    return onnxruntime


@dataclass
class Session:
    """An onnxruntime session and what actually runs it."""

    session: object
    providers: list[str]  # session.get_providers(): what runs, not what was asked
    note: str

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        name = self.session.get_inputs()[0].name
        return self.session.run(None, {name: x})


def provider_list(choice: str) -> tuple[list, str]:
    """The providers to ask onnxruntime for, and why: CUDA where onnxruntime-gpu offers it."""
    if choice not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {choice!r}")
    ort = import_onnxruntime()
    available = ort.get_available_providers()
    cuda = ("CUDAExecutionProvider", {"use_tf32": "0"})  # TF32 would cost ~1e-3 relative error on fp32
    if choice == "cpu":
        return ["CPUExecutionProvider"], "CPU (asked for)"
    if "CUDAExecutionProvider" in available:
        return [cuda, "CPUExecutionProvider"], "CUDA (onnxruntime-gpu), TF32 off"
    if choice == "cuda":
        raise MissingRuntimeError(
            f"--provider cuda: this onnxruntime ({ort.__version__}) has no CUDA provider (available: {', '.join(available)}); "
            "install onnxruntime-gpu instead of onnxruntime: pip uninstall onnxruntime && pip install 'rlrr[gpu]'"
        )
    return ["CPUExecutionProvider"], "CPU: onnxruntime here has no CUDA provider (onnxruntime-gpu and a GPU give CUDA)"


def make_session(path: str, choice: str = "auto") -> Session:
    """An onnxruntime session on `path` with the chosen providers, reporting what really runs."""
    ort = import_onnxruntime()
    providers, note = provider_list(choice)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: onnxruntime warns about every fallback to CPU
    session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    used = list(session.get_providers())
    wanted_cuda = any(isinstance(p, tuple) for p in providers)
    if wanted_cuda and "CUDAExecutionProvider" not in used:
        if choice == "cuda":
            raise MissingRuntimeError(f"--provider cuda: onnxruntime has a CUDA provider but it could not start (providers in use: {used}); check the CUDA/cuDNN libraries and the GPU")
        note = "CPU: the CUDA provider could not start (no GPU, or CUDA/cuDNN libraries missing), onnxruntime fell back"
    return Session(session, used, note)


# --- conditioning -----------------------------------------------------------------------


#: An fp32 export passes within this many times the model's own fp32 error (PyTorch float32 against
#: float64, same weights, same inputs) when that is above the fixed tolerance: two fp32 evaluations
#: each sit about that far from the exact value, so they can differ by about twice it. Measured:
#: onnxruntime vs PyTorch at 1.3-1.7x PyTorch's own fp32-vs-fp64 error on visformer_tiny, 0.9-2.8x
#: on the tests' cancellation model (tests/test_quantize.py).
CONDITIONING_FACTOR = 4.0


@torch.no_grad()
def fp32_conditioning(model: nn.Module, inputs: Sequence[Tensor]) -> list[float]:
    """Per output, max over inputs of |float32 - float64| / max |float64| of `model` itself.

    How far float32 arithmetic alone takes this model from its exact value: an ill-conditioned model
    (saturated softmax over logits in the thousands) loses digits that no exporter can keep. The
    model is converted to float64 in place and back (lossless for float32 weights).
    """
    low = reference_outputs(model, inputs)
    model.double()
    try:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        high = [[t.detach().cpu() for t in flatten(model(x.to(device, torch.float64)))] for x in inputs]
    finally:
        model.float()
    worst = [0.0] * len(low[0])
    for lo, hi in zip(low, high):
        for i, (a, b) in enumerate(zip(lo, hi)):
            scale = float(b.abs().max()) if b.numel() else 0.0
            diff = float((a.double() - b).abs().max()) if b.numel() else 0.0
            worst[i] = max(worst[i], diff / scale if scale > 0 else 0.0)
    return worst
