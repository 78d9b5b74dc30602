"""Find sites: trace the model with torch.fx and read which ops consume which parameters.

fx is how we *see* the model; the eager model is rewritten elsewhere (design.md §3). Module
calls of torch.nn layers and functional calls (`F.linear`, `F.conv*d`, `F.layer_norm`) whose
weight is a parameter read by `get_attr` become sites. Leaf modules that hold layers are looked
into (traced alone); parts fx cannot trace are searched for torch.nn layers by type, and the
`Discovery` says which parts were not analysed.
"""

from __future__ import annotations

import dis
import functools
import inspect
import re
from bisect import bisect_left
from dataclasses import dataclass, field
from types import CodeType

import torch.nn.functional as F
from torch import fx, nn

from rlrr.chunks import Chunks, check_user_chunks, chunks_in_graph, named_chunks, opaque_consumer, user_chunks
from rlrr.errors import ConfigError
from rlrr.sites import BIAS_ABSENT, BIAS_CREATABLE, BIAS_PRESENT, Site, Skipped

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_FUNCTION_KINDS = {F.linear: "linear", F.conv1d: "conv", F.conv2d: "conv", F.conv3d: "conv", F.layer_norm: "norm"}
_FUNCTION_NAMES = {F.linear: "F.linear", F.conv1d: "F.conv1d", F.conv2d: "F.conv2d", F.conv3d: "F.conv3d", F.layer_norm: "F.layer_norm"}
# (weight position, bias position) among the positional arguments of each functional op
_ARG_POSITIONS = {"linear": (1, 2), "conv": (1, 2), "norm": (2, 3)}
# Methods that only change dtype, device or memory layout: the weight stays "a parameter read".
_CAST_METHODS = {"to", "type", "float", "double", "half", "bfloat16", "contiguous"}
_SHARED_BIAS = "q, k and v share one in_proj_bias: no per-projection bias to shift"


@dataclass
class Discovery:
    """Every site found, in execution order, and what was seen but not adaptable."""

    sites: list[Site] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    not_analysed: list[tuple[str, str]] = field(default_factory=list)
    user_chunks: dict[str, int] = field(default_factory=dict)  # the `chunks=` override, {glob: count}
    _seen: set[int] = field(default_factory=set)  # ids of weights already a site: one adapter per parameter

    def add(self, site: Site, weight: nn.Parameter | None) -> None:
        if weight is not None:
            if id(weight) in self._seen:
                return
            self._seen.add(id(weight))
        self.sites.append(site)


@functools.lru_cache(maxsize=512)
def _instructions(code: CodeType) -> tuple[dis.Instruction, ...]:
    return tuple(dis.get_instructions(code))


class _Proxy(fx.Proxy):
    """fx's Proxy with the caller's bytecode disassembled once per function, not once per unpacking.

    `q, k, v = qkv.unbind(0)` iterates a proxy; fx then disassembles the calling function to read
    how many names it unpacks into, every time (a fifth of tracing ViT-H/14). Same answer, cached.
    """

    def __iter__(self):
        caller = inspect.currentframe().f_back
        code = _instructions(caller.f_code)
        instruction = code[bisect_left(code, caller.f_lasti, key=lambda i: i.offset)]
        if instruction.opname == "UNPACK_SEQUENCE":
            return (self[i] for i in range(instruction.argval))
        return self.tracer.iter(self)


class _Tracer(fx.Tracer):
    """fx's tracer with a parameter's name found by a dict, not a walk of the whole model, and `_Proxy`.

    fx looks up every parameter attribute a module reads by scanning `root.named_parameters()`:
    quadratic in the model's size (a third of `apply` on ViT-H/14). Same names, same proxies.
    """

    def trace(self, root, concrete_args=None):
        self._names: dict[int, str] = {}
        if isinstance(root, nn.Module):
            for name, p in root.named_parameters():  # the first name of a tied parameter, as fx's scan finds
                self._names.setdefault(id(p), name)
        return super().trace(root, concrete_args)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        name = self._names.get(id(attr_val)) if isinstance(attr_val, nn.Parameter) and not self.param_shapes_constant else None
        if name is None:
            return super().getattr(attr, attr_val, parameter_proxy_cache)
        if name not in parameter_proxy_cache:
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
        return parameter_proxy_cache[name]


def make_tracer() -> fx.Tracer:
    """An fx tracer that keeps timm's not-traceable modules as leaves and wraps its functions."""
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:  # timm is optional for tracing
        return _Tracer()

    class TimmAwareTracer(_Tracer):
        # reason: timm marks these modules/functions as not symbolically traceable
        leaves = tuple(get_notrace_modules())

        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, self.leaves) or super().is_leaf_module(m, qualname)

    return TimmAwareTracer(autowrap_functions=tuple(get_notrace_functions()))


def discover(model: nn.Module, chunks: Chunks = None) -> Discovery:
    """All sites of `model`; never raises for an untraceable model (see `Discovery.not_analysed`).

    `chunks` ({glob on site name: count}) overrides how many projections a linear site holds.
    """
    found = Discovery(user_chunks=check_user_chunks(chunks))
    _analyse(model, "", found)
    _report_unused_layers(model, found)
    unused = [g for g in found.user_chunks if not any(user_chunks({g: 1}, s.name) for s in found.sites if s.kind == "linear")]
    if unused:
        raise ConfigError(f"chunks: {unused} match no linear site; sites are named like {[s.name for s in found.sites[:3]]}")
    return found


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _site_name(module_path: str, attr: str) -> str:
    if attr == "weight":
        return module_path or "weight"
    return _join(module_path, re.sub(r"_weight$", "", attr))


def _chunks(found: Discovery, name: str, features: int, out: fx.Node | None, root: nn.Module | None = None, by_type: int = 1) -> tuple[int, str]:
    """(chunks, how decided) for a linear site: the user's word, the module type, the graph, else the name."""
    given = user_chunks(found.user_chunks, name)
    if given is not None:
        if features % given:
            raise ConfigError(f"chunks: {name} has {features} output features, which {given} chunks do not divide")
        return given, "user"
    if by_type > 1:
        return by_type, "module type"
    if out is not None and root is not None:
        seen = chunks_in_graph(out, features, root)
        if seen > 1 or not opaque_consumer(out, root):
            return seen, "graph" if seen > 1 else ""
    named = named_chunks(name, features)
    return named, "name" if named > 1 else ""


def _bias_slot(owner: nn.Module, weight_attr: str) -> str | None:
    """The empty bias slot beside a weight (`bias` for `weight`, `in_proj_bias` for `in_proj_weight`), if any."""
    attr = weight_attr[: -len("weight")] + "bias" if weight_attr.endswith("weight") else None
    return attr if attr is not None and attr in owner._parameters and owner._parameters[attr] is None else None


def _is_torch_nn(m: nn.Module) -> bool:
    return type(m).__module__.startswith(("torch.nn", "torch.ao.nn"))


def _analyse(module: nn.Module, prefix: str, found: Discovery) -> None:
    try:
        graph = make_tracer().trace(module)
    except Exception as e:  # reason: any trace failure falls back to search by type
        found.not_analysed.append((prefix, f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"))
        if not _add_module_site(module, prefix, found, found_by="type"):
            _search_by_type(module, prefix, found)
        return
    _scan_graph(graph, module, prefix, found)


def _search_by_type(module: nn.Module, prefix: str, found: Discovery) -> None:
    for name, child in module.named_children():
        path = _join(prefix, name)
        if not _add_module_site(child, path, found, found_by="type") and any(True for _ in child.parameters()):
            _analyse(child, path, found)


def _add_module_site(m: nn.Module, path: str, found: Discovery, found_by: str = "trace", out: fx.Node | None = None,
                     root: nn.Module | None = None) -> bool:
    """Sites of a torch.nn layer; False if it is not one we know.

    A subclass defined elsewhere (timm's Conv2dSame) counts only when found by type or owner:
    otherwise it is traced, so that what its forward does with the weight is seen.
    """
    if found_by == "trace" and not _is_torch_nn(m):
        return False
    if isinstance(m, nn.MultiheadAttention):
        _add_attention_sites(m, path, found, found_by)
        return True
    if isinstance(m, (nn.Linear, *_CONVS)):
        kind = "linear" if isinstance(m, nn.Linear) else "conv"
        bias = BIAS_PRESENT if m.bias is not None else BIAS_CREATABLE
        chunks, chunks_from = _chunks(found, path, m.weight.shape[0], out, root) if kind == "linear" else (1, "")
        site = Site(_site_name(path, "weight"), kind, path, "weight", "bias", bias, tuple(m.weight.shape),
                    f"nn.{type(m).__name__}", chunks, found_by, chunks_from=chunks_from)
        found.add(site, m.weight)
        return True
    if isinstance(m, nn.LayerNorm):
        bias = BIAS_PRESENT if m.bias is not None else BIAS_CREATABLE
        site = Site(_site_name(path, "weight"), "norm", path, "weight", "bias", bias, tuple(m.normalized_shape),
                    "nn.LayerNorm", 1, found_by, weight_missing=m.weight is None)
        found.add(site, m.weight)
        return True
    return False


def _add_attention_sites(m: nn.MultiheadAttention, path: str, found: Discovery, found_by: str) -> None:
    """nn.MultiheadAttention reads its projections as tensors, not through module calls."""
    op = "nn.MultiheadAttention"
    # reason: its forward reads the projections (and their biases) as attributes at call time, so a
    # bias created in an empty slot is read; in_proj_weight holds q, k and v by definition.
    if m._qkv_same_embed_dim:
        bias = BIAS_PRESENT if m.in_proj_bias is not None else BIAS_CREATABLE
        name = _site_name(path, "in_proj_weight")
        chunks, chunks_from = _chunks(found, name, m.in_proj_weight.shape[0], None, by_type=3)
        found.add(Site(name, "linear", path, "in_proj_weight", "in_proj_bias", bias, tuple(m.in_proj_weight.shape), op,
                       chunks, found_by, chunks_from=chunks_from), m.in_proj_weight)
    else:
        for attr in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
            weight = getattr(m, attr)
            found.add(Site(_site_name(path, attr), "linear", path, attr, None, BIAS_ABSENT, tuple(weight.shape), op, 1, found_by,
                           bias_note=_SHARED_BIAS), weight)
    out = m.out_proj
    out_path = _join(path, "out_proj")
    bias = BIAS_PRESENT if out.bias is not None else BIAS_CREATABLE
    found.add(Site(_site_name(out_path, "weight"), "linear", out_path, "weight", "bias", bias, tuple(out.weight.shape), op, 1, found_by), out.weight)


def _scan_graph(graph: fx.Graph, root: nn.Module, prefix: str, found: Discovery) -> None:
    for node in graph.nodes:
        if node.op == "call_module":
            sub = root.get_submodule(node.target)
            path = _join(prefix, node.target)
            if not _add_module_site(sub, path, found, out=node, root=root) and any(True for _ in sub.parameters()):
                if _is_torch_nn(sub) and not any(True for _ in sub.children()):
                    continue  # a parameter-holding torch.nn layer of another kind: reported as unused
                _analyse(sub, path, found)
        elif node.op == "call_function" and node.target in _FUNCTION_KINDS:
            _add_function_site(node, root, prefix, found)
        elif node.op in ("call_function", "call_method"):
            _add_owned_weights(node, root, prefix, found)


def _parameter_read(node: object, root: nn.Module) -> tuple[str, nn.Parameter] | None:
    """The (qualified name, parameter) a node reads directly, through dtype/device casts."""
    while isinstance(node, fx.Node) and node.op == "call_method" and node.target in _CAST_METHODS:
        node = node.args[0]
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    try:
        value = root.get_parameter(node.target)
    except AttributeError:
        return None  # a buffer or constant
    return node.target, value


def _caller(node: fx.Node) -> str:
    """Where an op was called: the innermost module fx recorded, and the op's node name."""
    stack = node.meta.get("nn_module_stack") or {}
    module = next(reversed(stack.values()))[0] if stack else ""
    return f"{module}.{node.name}" if module else node.name


def _add_function_site(node: fx.Node, root: nn.Module, prefix: str, found: Discovery) -> None:
    kind = _FUNCTION_KINDS[node.target]
    op = _FUNCTION_NAMES[node.target]
    weight_pos, bias_pos = _ARG_POSITIONS[kind]
    names = ("weight", "bias")
    args = [node.args[i] if len(node.args) > i else node.kwargs.get(n) for i, n in zip((weight_pos, bias_pos), names)]
    weight = _parameter_read(args[0], root)
    if weight is None:
        where = _join(prefix, _caller(node))
        if args[0] is not None:
            found.skipped.append(Skipped(where, op, "its weight is computed, not a parameter read directly"))
        else:
            found.skipped.append(Skipped(where, op, "no affine weight in a functional call"))
        return
    fqn, param = weight
    module_path, _, attr = _join(prefix, fqn).rpartition(".")
    name = _site_name(module_path, attr)
    bias = _parameter_read(args[1], root)
    if bias is not None and _join(prefix, bias[0]).rpartition(".")[0] == module_path:
        bias_attr, state, note = bias[0].rpartition(".")[2], BIAS_PRESENT, ""
    elif bias is not None:
        bias_attr, state, note = None, BIAS_ABSENT, "its bias belongs to another module"
    elif args[1] is None and (slot := _bias_slot(root.get_submodule(fqn.rpartition(".")[0]), attr)):
        # reason: the op got None where its module has an empty bias slot, as nn.LayerNorm.forward
        # passes `self.bias` (timm's LayerNormNoBias): a bias created in that slot is what it reads.
        bias_attr, state, note = slot, BIAS_CREATABLE, ""
    else:
        why = "its bias is computed by the model, not a parameter read" if args[1] is not None else "its op reads no bias and its module has no bias slot"
        bias_attr, state, note = None, BIAS_ABSENT, why
    chunks, chunks_from = _chunks(found, name, param.shape[0], node, root) if kind == "linear" else (1, "")
    found.add(Site(name, kind, module_path, attr, bias_attr, state, tuple(param.shape), op, chunks, chunks_from=chunks_from, bias_note=note), param)


def _add_owned_weights(node: fx.Node, root: nn.Module, prefix: str, found: Discovery) -> None:
    """A layer's weight handed to another function (torchvision's wrapped `shifted_window_attention`).

    The owner is a torch.nn layer, so its weight is that layer's matrix whatever reads it, and
    rewriting the parameter reaches the function too.
    """
    for arg in (*node.args, *node.kwargs.values()):
        read = _parameter_read(arg, root)
        if read is None:
            continue
        module_path, _, attr = read[0].rpartition(".")
        owner = root.get_submodule(module_path)
        if attr == "weight" and _is_torch_nn(owner):
            _add_module_site(owner, _join(prefix, module_path), found, found_by="owner")


def _report_unused_layers(model: nn.Module, found: Discovery) -> None:
    """List each parameter no site adapts, once, with the layer that holds it."""
    adapted = {(s.module, s.weight) for s in found.sites} | {(s.module, s.bias) for s in found.sites if s.bias}
    analysed_out = {name for name, _ in found.not_analysed}
    for module_path, m in model.named_modules():
        for attr, p in m.named_parameters(recurse=False):
            if (module_path, attr) in adapted or id(p) in found._seen:
                continue
            reason = "not analysed (fx could not trace it)" if module_path in analysed_out else f"{type(m).__name__}.{attr} is not read as a linear, conv or LayerNorm weight"
            found.skipped.append(Skipped(_join(module_path, attr), type(m).__name__, reason))
