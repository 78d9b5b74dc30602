"""Where an export departs from the unmerged model: module by module, in execution order.

The dynamo exporter records, on every ONNX node, the module path it came from
(`pkg.torch.onnx.name_scopes`: `['', 'blocks', 'blocks.0', 'blocks.0.mlp', 'blocks.0.mlp.fc2',
'linear_3']`). A module's output in the ONNX graph is then the value made inside its scope and
read outside it; no name is guessed. The same values are added as graph outputs, the exported
file is run once, and each is compared with what a forward hook saw on the unmerged PyTorch
model for the same input (captured before the fold). onnxruntime's QDQ debugging tools
(`onnxruntime.quantization.qdq_loss_debug`) match float and quantized activations the same way,
by value name; the QDQ quantizer keeps the float model's value names, so the map read from the
fp32 file serves its INT8 twin.
"""

from __future__ import annotations

import ast
import fnmatch
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

SCOPES = "pkg.torch.onnx.name_scopes"
#: Module outputs kept for localisation: the first sample of each checked input, until this many bytes.
PROBE_BYTES = 512 * 2**20


@dataclass
class Divergence:
    """One module whose exported output departs from the unmerged model's."""

    module: str
    max_rel: float  # max |exported - unmerged| / max |unmerged| over the module's output
    tolerance: float

    def to_dict(self) -> dict:
        return {"module": self.module, "max_rel": self.max_rel, "tolerance": self.tolerance}


def node_modules(graph) -> dict[str, list[str]]:
    """ONNX value name -> the module path (outermost first) of the node that makes it."""
    scopes: dict[str, list[str]] = {}
    for node in graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        try:
            path = ast.literal_eval(meta[SCOPES])[1:-1] if SCOPES in meta else []  # drop the root '' and the op's own name
        except (ValueError, SyntaxError):
            path = []
        for value in node.output:
            scopes[value] = list(path)
    return scopes


def module_outputs(graph) -> dict[str, str]:
    """Module name -> the one ONNX value that carries its output, from the exporter's name scopes.

    A value carries module M's output when a node inside M makes it and a node outside M reads it
    (or it is a graph output). Modules with no such value (folded into a neighbour) or several
    (a module called twice, a tuple output) are left out: they cannot be compared one to one.
    """
    scopes = node_modules(graph)
    readers: dict[str, list[str]] = {}
    for node in graph.node:
        inner = scopes.get(node.output[0], []) if node.output else []
        for value in node.input:
            readers.setdefault(value, []).append(inner)
    graph_outputs = {o.name for o in graph.output}
    found: dict[str, list[str]] = {}
    for value, path in scopes.items():
        for module in path:
            outside = value in graph_outputs or any(module not in reader for reader in readers.get(value, []))
            if outside:
                found.setdefault(module, []).append(value)
    return {m: values[0] for m, values in found.items() if len(values) == 1}


def match_modules(patterns: Sequence[str], names: Iterable[str]) -> dict[str, list[str]]:
    """Each fnmatch pattern -> the module names it matches (a module matches a pattern that
    matches it or one of its parents, so `blocks.3` keeps everything inside block 3)."""
    names = list(names)
    out = {}
    for pattern in patterns:
        out[pattern] = [n for n in names if fnmatch.fnmatchcase(n, pattern) or any(fnmatch.fnmatchcase(p, pattern) for p in _parents(n))]
    return out


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


class Capture:
    """Forward hooks that keep each module's first output (a single tensor), in execution order.

    A module that runs more than once in a forward is dropped: its output has no single value.
    """

    def __init__(self, model: nn.Module) -> None:
        self.outputs: dict[str, Tensor] = {}
        self.calls: dict[str, int] = {}
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in model.named_modules() if n and "parametrizations" not in n.split(".")]

    def _hook(self, name: str) -> Callable:
        def hook(module, args, output):
            self.calls[name] = self.calls.get(name, 0) + 1
            if isinstance(output, Tensor) and output.is_floating_point():
                self.outputs.setdefault(name, output.detach().float().cpu().clone())

        return hook  # returns None: the output is left as it is

    def close(self) -> dict[str, Tensor]:
        for h in self.handles:
            h.remove()
        return {n: t for n, t in self.outputs.items() if self.calls.get(n) == 1}


@torch.no_grad()
def capture(model: nn.Module, x: Tensor) -> dict[str, Tensor]:
    """Every module's output (float32, CPU) for input `x`, in execution order."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    hooks = Capture(model)
    try:
        model(x.to(device, dtype))
    finally:
        found = hooks.close()
    return found


def capture_probes(model: nn.Module, inputs: Sequence[Tensor], budget: int = PROBE_BYTES) -> dict[int, dict[str, Tensor]]:
    """Input index -> every module's output for that input's first sample, while within `budget` bytes
    (always the first input's). A failed check is then localised on the probe that fails worst."""
    probes: dict[int, dict[str, Tensor]] = {}
    used = 0
    for i, x in enumerate(inputs):
        found = capture(model, x[:1])
        size = sum(t.numel() * t.element_size() for t in found.values())
        if probes and used + size > budget:
            break
        probes[i], used = found, used + size
    return probes


def relative_error(got: Tensor, expected: Tensor) -> float:
    """max |got - expected| / max |expected| (the check's own measure, against the output's scale)."""
    if not bool(torch.isfinite(got).all()):
        return float("inf")
    diff = float((got.double() - expected.double()).abs().max())
    scale = float(expected.double().abs().max())
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))


def exported_values(path: str | os.PathLike, values: Sequence[str], x: np.ndarray, make_session: Callable[[str], object]) -> dict[str, np.ndarray]:
    """The named intermediate values of an ONNX file on input `x`: a copy of the graph that also
    outputs them is written beside the file (so external data still resolves), run, and removed."""
    import onnx

    path = Path(path)
    proto = onnx.load(str(path), load_external_data=False)
    made = {o for node in proto.graph.node for o in node.output}  # a quantizer may fuse some away (Relu into its producer)
    present = {o.name for o in proto.graph.output}
    for v in values:
        if v in made and v not in present:
            proto.graph.output.append(onnx.ValueInfoProto(name=v))
    probe = path.with_name(f".probe.{path.name}")
    try:
        onnx.save(proto, str(probe))
        session = make_session(str(probe))
        names = [o.name for o in session.get_outputs()]
        wanted = [v for v in values if v in names]
        got = session.run(wanted, {session.get_inputs()[0].name: x})
    finally:
        probe.unlink(missing_ok=True)
    return dict(zip(wanted, got))


def compare_modules(expected: dict[str, Tensor], got: dict[str, np.ndarray | Tensor]) -> list[tuple[str, float]]:
    """(module, max rel error) for every module both sides have, in the expected (execution) order."""
    out = []
    for module, want in expected.items():
        if module not in got:
            continue
        have = torch.as_tensor(np.asarray(got[module]) if not isinstance(got[module], Tensor) else got[module]).float()
        if tuple(have.shape) != tuple(want.shape):
            continue
        out.append((module, relative_error(have, want)))
    return out


def departures(errors: Sequence[tuple[str, float]], tolerance: Callable[[str], float]) -> list[Divergence]:
    """The modules past their tolerance, in execution order."""
    return [Divergence(m, e, tolerance(m)) for m, e in errors if not e <= tolerance(m)]
