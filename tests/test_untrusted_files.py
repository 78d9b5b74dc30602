"""Adapter files are untrusted: loading one sets adapter values (and allowed heads) and nothing else.

- crafted keys aimed at base parameters, wrong shapes and dtypes, non-finite values: refused before
  anything changes;
- adapter names never become paths;
- a hypothesis property over >= 500 random corruptions of a valid file (flipped bytes, dropped,
  renamed, reshaped, retyped and added tensors, changed metadata): loading either succeeds with
  only adapter values changed, or raises the project's error with the model unchanged.
"""

from __future__ import annotations

import copy
import json
import os
import struct

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

import rlrr


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(6)
        self.qkv = nn.Linear(6, 12)
        self.fc = nn.Linear(4, 6, bias=False)
        self.head = nn.Linear(6, 3)
        self.scale = nn.Parameter(torch.ones(6))

    def forward(self, x):
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        return self.head(self.fc(q * k + v) * self.scale)


def base_model() -> nn.Module:
    torch.manual_seed(0)
    return Net()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def base_values(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's tensors by their original names, read through any parametrization."""
    out = {}
    for key, value in model.state_dict().items():
        if "rlrr_" in key:
            continue
        out[key.replace(".parametrizations.", ".").replace(".original", "")] = value
    return out


@pytest.fixture(scope="module")
def good_file(tmp_path_factory) -> tuple[bytes, dict]:
    model = rlrr.apply(base_model(), trainable="head")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1)
    path = rlrr.save_adapter(model, tmp_path_factory.mktemp("good") / "good.safetensors")
    return path.read_bytes(), rlrr.read_adapter_file(path).__dict__


def write(tmp_path, tensors: dict, meta: dict, name: str = "bad.safetensors"):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return path


def parts(raw: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load

    header_len = struct.unpack("<Q", raw[:8])[0]
    meta = json.loads(raw[8:8 + header_len])["__metadata__"]
    return dict(meta), dict(load(raw))


@pytest.mark.parametrize("key, value", [
    ("trained.qkv.parametrizations.weight.original", torch.zeros(12, 6)),
    ("trained.qkv.weight", torch.zeros(12, 6)),
    ("trained.scale", torch.zeros(6)),
    ("trained.norm.weight", torch.zeros(6)),
])
def test_a_crafted_file_cannot_touch_a_base_parameter(tmp_path, good_file, key, value) -> None:
    meta, tensors = parts(good_file[0])
    path = write(tmp_path, {**tensors, key: value}, meta)
    model = base_model()
    before = snapshot(model)
    with pytest.raises(rlrr.RLRRError):
        rlrr.load_adapter(model, path, trainable="head")
    assert not rlrr.adapters_of(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_head_loads_only_where_the_caller_allows_it(tmp_path, good_file) -> None:
    meta, tensors = parts(good_file[0])
    path = write(tmp_path, tensors, meta)
    model = base_model()  # not a timm model: it declares no classifier
    with pytest.raises(rlrr.AdapterMismatchError, match=r"head.*trainable=\["):
        rlrr.load_adapter(model, path)
    assert not rlrr.adapters_of(model)
    rlrr.load_adapter(model, path, trainable="head")
    assert model.head.weight.requires_grad


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_values_are_refused_when_the_file_is_read(tmp_path, good_file, value) -> None:
    meta, tensors = parts(good_file[0])
    key = next(k for k in tensors if k.startswith("adapter."))
    tensors[key] = tensors[key].clone().fill_(value)
    with pytest.raises(rlrr.AdapterFileError, match="NaN or Inf"):
        rlrr.read_adapter_file(write(tmp_path, tensors, meta))


@pytest.mark.parametrize("name", ["../../x", "/tmp/x", "", ".", "..", "a/b", "a\\b", "a\0b", ".hidden", "x" * 65, 5, None, "naïve"])
def test_adapter_names_never_become_paths(tmp_path, name) -> None:
    model = rlrr.apply(base_model(), trainable="head")
    with pytest.raises(rlrr.ConfigError, match="adapter names are"):
        rlrr.add_adapter(model, name, trainable="head")
    assert rlrr.list_adapters(model) == ["default"]
    rlrr.save_adapters(model, tmp_path)
    assert os.listdir(tmp_path) == ["default.safetensors"]


def test_names_are_unique_regardless_of_case(tmp_path) -> None:
    model = rlrr.apply(base_model(), trainable="head")
    with pytest.raises(rlrr.ConfigError, match="'default' already exists"):
        rlrr.add_adapter(model, "Default", trainable="head")


def test_save_adapters_refuses_before_writing_anything(tmp_path) -> None:
    model = rlrr.apply(base_model(), trainable="head")
    rlrr.add_adapter(model, "cars", trainable="head")
    with pytest.raises(rlrr.UnknownAdapterError):
        rlrr.save_adapters(model, tmp_path, ["cars", "nope"])
    with pytest.raises(rlrr.ConfigError, match="existing folder"):
        rlrr.save_adapters(model, tmp_path / "missing")
    assert os.listdir(tmp_path) == []


def test_load_adapters_checks_every_file_before_adding_any(tmp_path, good_file) -> None:
    meta, tensors = parts(good_file[0])
    good = write(tmp_path, tensors, meta, "cars.safetensors")
    bad = tmp_path / "..hidden.safetensors"
    bad.write_bytes(good.read_bytes())
    model = base_model()
    with pytest.raises(rlrr.ConfigError, match="adapter names are"):
        rlrr.load_adapters(model, [good, bad], trainable="head")
    assert rlrr.list_adapters(model) == [] and not rlrr.adapters_of(model)


def test_a_predicate_that_raises_ends_in_our_error() -> None:
    def broken(module, name):
        raise KeyError("oops")

    model = base_model()
    with pytest.raises(rlrr.UnknownTargetKindError, match="broken.*raised on site.*KeyError"):
        rlrr.apply(model, broken)
    assert not rlrr.adapters_of(model)


def test_a_kind_with_no_site_is_not_suggested_as_a_correction() -> None:
    class Linears(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x)

    with pytest.raises(rlrr.NoMatchingTargetsError, match="no norm site") as e:
        rlrr.plan(Linears(), "norm")
    assert "did you mean" not in str(e.value)


def test_training_everything_in_full_leaves_nothing_to_adapt_and_is_refused() -> None:
    model = base_model()
    with pytest.raises(rlrr.NoMatchingTargetsError, match="nothing left to adapt"):
        rlrr.apply(model, trainable="*")
    assert all(p.requires_grad for p in model.parameters())  # untouched: still the defaults
    assert not rlrr.adapters_of(model)


# --- the property: random corruptions -------------------------------------------------------------

MUTATIONS = ("flip", "drop", "rename", "reshape", "retype", "add", "config", "sites", "user", "format", "truncate")
RENAMES = ("trained.qkv.weight", "trained.scale", "trained.norm.parametrizations.weight.original", "adapter.fc.rlrr_s_left",
           "trained.head.weight", "adapter.qkv.rlrr_bogus", "trained.", "other.x", "trained.head..weight", "adapter.norm.rlrr_scale")
SITE_CHANGES = (("name", "head"), ("name", "scale"), ("kind", "conv"), ("kind", "norm"), ("shape", [6, 6]), ("shape", [3]),
                ("chunks", 2), ("chunks", 5), ("method", "ssf"), ("weight", "bias"), ("module", "head"), ("bias", "weight"),
                ("bias_state", "creatable"), ("weight_missing", True), ("shape", "x"), ("extra", 1))
CONFIG_CHANGES = ({"rank": 2}, {"rank": "2"}, {"scaling": "left"}, {"residual": "False"}, {"lowrank": True}, {"init": "zeros"},
                  {"fused_chunks": False}, {"shift": False}, {"colour": "red"}, {"rank": -1})


def corrupt(raw: bytes, data) -> bytes | tuple[dict, dict]:
    """One random corruption of a valid adapter file: raw bytes, or (metadata, tensors) to write."""
    kind = data.draw(st.sampled_from(MUTATIONS))
    if kind == "flip":
        out = bytearray(raw)
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(out) - 1))
            out[i] ^= data.draw(st.integers(1, 255))
        return bytes(out)
    if kind == "truncate":
        return raw[: data.draw(st.integers(0, len(raw) - 1))]
    meta, tensors = parts(raw)
    keys = sorted(tensors)
    key = data.draw(st.sampled_from(keys))
    if kind == "drop":
        del tensors[key]
    elif kind == "rename":
        tensors[data.draw(st.sampled_from(RENAMES))] = tensors.pop(key)
    elif kind == "reshape":
        tensors[key] = torch.zeros(data.draw(st.lists(st.integers(1, 13), min_size=1, max_size=3)))
    elif kind == "retype":
        dtype = data.draw(st.sampled_from([torch.float16, torch.float64, torch.bfloat16, torch.int32, torch.int64, torch.bool, torch.uint8]))
        tensors[key] = tensors[key].to(dtype)
    elif kind == "add":
        tensors[data.draw(st.sampled_from(RENAMES))] = torch.randn(data.draw(st.sampled_from([(6,), (3, 6), (12, 6), (1, 1, 6)])))
    elif kind == "config":
        meta["config"] = json.dumps({**json.loads(meta["config"]), **data.draw(st.sampled_from(CONFIG_CHANGES))})
    elif kind == "sites":
        sites = json.loads(meta["sites"])
        i = data.draw(st.integers(0, len(sites) - 1))
        field, value = data.draw(st.sampled_from(SITE_CHANGES))
        sites[i][field] = value
        if data.draw(st.booleans()):
            sites.append(sites[i])
        meta["sites"] = json.dumps(sites)
    elif kind == "user":
        meta["user"] = data.draw(st.sampled_from(["[]", "{", '"x"', "null", '{"a": 1}']))
    else:
        meta["format"] = data.draw(st.sampled_from(["rlrr.adapter/2", "", "pickle"]))
    return meta, tensors


@settings(max_examples=620, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_random_corruptions_load_cleanly_or_change_nothing(tmp_path, good_file, data) -> None:
    bad = corrupt(good_file[0], data)
    path = tmp_path / "corrupt.safetensors"
    if isinstance(bad, bytes):
        path.write_bytes(bad)
    else:
        try:
            save_file({k: v.contiguous() for k, v in bad[1].items()}, str(path), metadata=bad[0])
        except Exception:  # safetensors refuses to write it (e.g. an empty key): nothing to load
            event("not writable as safetensors")
            return
    model = base_model()
    before, flags = snapshot(model), {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        rlrr.load_adapter(model, path, trainable="head")
    except rlrr.RLRRError as e:
        event(f"refused: {type(e).__name__}")
        assert not rlrr.adapters_of(model)
        after = model.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
        return
    event("loaded")  # e.g. a flipped byte in a tensor's data: a finite value, only adapter values change
    values = base_values(model)
    for key, value in before.items():
        if not key.startswith("head."):
            assert torch.equal(values[key], value), key
