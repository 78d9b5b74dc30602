"""How many projections a linear layer holds (q, k, v of a fused `qkv`): read from the graph.

A fused projection's output is split into equal chunks along its features: reshaped to
(..., C, heads, dim) and then unbound or indexed along the C axis (timm ViT, Swin, BEiT, EVA,
PVT's `kv`), or cut by `chunk`/`split`. `chunks_in_graph` looks for exactly that downstream of
the op. The name table is the fallback where the graph cannot see the output (a layer found by
type, or a weight handed to a wrapped function); users override both with `chunks=`.
"""

from __future__ import annotations

import fnmatch
import math
import operator
from collections.abc import Mapping

import torch
from torch import fx, nn

from rlrr.errors import ConfigError

#: Fallback only: fused projections named by convention, for outputs the graph does not show.
NAMED_CHUNKS = {"qkv": 3, "in_proj": 3, "to_qkv": 3, "qkv_proj": 3, "c_attn": 3, "kv": 2, "to_kv": 2}

Chunks = Mapping[str, int] | None  # {fnmatch glob on site name: chunk count}, given by the user

_RESHAPES = {"reshape", "view"}
_PASS_THROUGH = {"contiguous", "float", "to", "type", "half", "bfloat16"}
# torch.nn layers that keep a tensor's layout: a split after them is a split of the projection
_SAME_LAYOUT = (nn.Dropout, nn.Identity, nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid)


def _int_args(node: fx.Node) -> tuple[list, int]:
    """The shape a reshape/view asks for, and the index where its trailing run of ints starts."""
    shape = list(node.args[1:])
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = list(shape[0])
    start = len(shape)
    while start > 0 and type(shape[start - 1]) is int:
        start -= 1
    return shape, start


def _split_axis(node: fx.Node, features: int) -> tuple[int, int, int] | None:
    """(axis, rank, count) where a reshape splits the last dim `features` into (count, ...)."""
    shape, start = _int_args(node)
    trailing = shape[start:]
    for j in range(len(trailing) - 1, -1, -1):  # the shortest suffix of known sizes that is the features
        group = trailing[j:]
        if -1 not in group and math.prod(group) == features:
            return (start + j, len(shape), group[0]) if len(group) > 1 else None
    known = [n for n in trailing if n != -1]
    if trailing.count(-1) == 1 and trailing[0] != -1 and len(trailing) > 1 and features % math.prod(known) == 0:
        return start, len(shape), trailing[0]  # (..., C, heads, -1): the -1 is the head dim
    return None


def _unbinds(node: fx.Node, axis: int, rank: int) -> bool:
    """Whether `node`'s output is unbound or indexed along `axis` (followed through permutes)."""
    for user in node.users:
        name = user.target if user.op == "call_method" else getattr(user.target, "__name__", None)
        if user.op == "call_method" and name in _PASS_THROUGH:
            if _unbinds(user, axis, rank):
                return True
        elif name == "permute":
            dims = list(user.args[1:])
            if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
                dims = list(dims[0])
            dims = [d % rank for d in dims if type(d) is int]
            if len(dims) == rank and _unbinds(user, dims.index(axis), rank):
                return True
        elif name == "transpose" and len(user.args) == 3 and all(type(d) is int for d in user.args[1:]):
            a, b = (d % rank for d in user.args[1:])
            if _unbinds(user, b if axis == a else a if axis == b else axis, rank):
                return True
        elif name == "unbind":
            dim = user.args[1] if len(user.args) > 1 else user.kwargs.get("dim", 0)
            if type(dim) is int and dim % rank == axis:
                return True
        elif user.op == "call_function" and user.target is operator.getitem:
            index = user.args[1] if isinstance(user.args[1], tuple) else (user.args[1],)
            if axis < len(index) and type(index[axis]) is int and Ellipsis not in index[:axis]:
                return True
    return False


def _cut(user: fx.Node, features: int) -> int:
    """The chunk count of a `chunk`/`split` along the last dim, else 1."""
    name = user.target if user.op == "call_method" else getattr(user.target, "__name__", None)
    if name not in ("chunk", "split", "tensor_split") or user.op not in ("call_method", "call_function"):
        return 1
    arg = user.args[1] if len(user.args) > 1 else user.kwargs.get("chunks", user.kwargs.get("split_size_or_sections"))
    dim = user.args[2] if len(user.args) > 2 else user.kwargs.get("dim", 0)
    if dim != -1:
        return 1
    if name in ("chunk", "tensor_split") and type(arg) is int and arg > 1 and features % arg == 0:
        return arg
    if name == "split" and type(arg) is int and 0 < arg < features and features % arg == 0:
        return features // arg
    if isinstance(arg, (list, tuple)) and len(arg) > 1 and len(set(arg)) == 1 and sum(arg) == features:
        return len(arg)
    return 1


def _module(user: fx.Node, root: nn.Module) -> nn.Module | None:
    return root.get_submodule(user.target) if user.op == "call_module" else None


def chunks_in_graph(out: fx.Node, features: int, root: nn.Module) -> int:
    """How many equal chunks the graph splits a projection's output (`features` wide) into; 1 if none."""
    for user in out.users:
        if isinstance(_module(user, root), _SAME_LAYOUT):
            count = chunks_in_graph(user, features, root)
            if count > 1:
                return count
            continue
        count = _cut(user, features)
        if count > 1:
            return count
        name = user.target if user.op == "call_method" else getattr(user.target, "__name__", None)
        if name in _RESHAPES or user.target is torch.reshape:
            split = _split_axis(user, features)
            if split is not None and split[2] > 1 and _unbinds(user, split[0], split[1]):
                return split[2]
    return 1


def opaque_consumer(out: fx.Node, root: nn.Module) -> bool:
    """Whether the output flows into something the graph cannot look into (a leaf module, a wrapped function)."""
    for user in out.users:
        module = _module(user, root)
        if isinstance(module, _SAME_LAYOUT):
            if opaque_consumer(user, root):
                return True
        elif module is not None and not type(module).__module__.startswith("torch.nn"):
            return True
        if user.op == "call_function" and not getattr(user.target, "__module__", "").startswith(("torch", "_operator", "operator", "builtins")):
            return True
    return False


def named_chunks(site_name: str, features: int) -> int:
    """The name table's chunk count for a site, 1 where it names none or the width does not divide."""
    count = NAMED_CHUNKS.get(site_name.rsplit(".", 1)[-1], 1)
    return count if features % count == 0 else 1


def check_user_chunks(chunks: Chunks) -> dict[str, int]:
    """The user's `chunks=` mapping, validated: {glob: count >= 1}."""
    if chunks is None:
        return {}
    if not isinstance(chunks, Mapping):
        raise ConfigError(f"chunks must be a mapping {{'<glob on site name>': count}}, got {type(chunks).__name__}")
    for glob, count in chunks.items():
        if not isinstance(glob, str) or type(count) is not int or count < 1:
            raise ConfigError(f"chunks maps a site-name glob to a count >= 1, got {glob!r}: {count!r}")
    return dict(chunks)


def user_chunks(chunks: dict[str, int], site_name: str) -> int | None:
    """The count the user gave for this site, if a glob matches it (the first that does)."""
    return next((count for glob, count in chunks.items() if fnmatch.fnmatchcase(site_name, glob)), None)
