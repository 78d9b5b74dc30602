"""RLRRConfig as the one carrier of options: `config=` or keyword options, validated once.

Also: each variant's default init (the ablations start at ΔW = 0), the shift rule and its report,
and adapter files written before the redesign (sites without the new fields) still loading.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import rlrr


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(6)
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 4, bias=False)
        self.conv = nn.Conv2d(3, 4, 3, bias=False)

    def forward(self, x, img):
        return self.fc2(self.fc1(self.norm(x))), self.conv(img)


def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 6, generator=g), torch.randn(2, 3, 5, 5, generator=g)


def test_config_and_keyword_options_give_the_same_plan() -> None:
    by_config = rlrr.plan(Net(), config=rlrr.RLRRConfig(rank=2, shift=False))
    by_options = rlrr.plan(Net(), rank=2, shift=False)
    assert by_config.config == by_options.config
    assert by_config.adapter_parameters == by_options.adapter_parameters


def test_config_and_an_option_together_are_refused_naming_the_option() -> None:
    model = Net()
    with pytest.raises(rlrr.ConfigError, match="option 'rank' given beside config="):
        rlrr.apply(model, config=rlrr.RLRRConfig(), rank=2)
    assert not rlrr.adapters_of(model)


@pytest.mark.parametrize("options, error, match", [
    ({"rnak": 2}, rlrr.ConfigError, "unknown RLRR options \\['rnak'\\]"),
    ({"residual": "False"}, rlrr.ConfigError, "residual must be True or False, got 'False'"),
    ({"shift": 1}, rlrr.ConfigError, "shift must be True or False"),
    ({"rank": 1.0}, rlrr.InvalidRankError, "rank must be an integer"),
    ({"rank": True}, rlrr.InvalidRankError, "rank must be an integer"),
    ({"scaling": "top"}, rlrr.ConfigError, "scaling must be"),
    ({"scaling": "left", "rank": 2}, rlrr.InvalidRankError, "rank must be 1"),
    ({"lowrank": True, "residual": False}, rlrr.ConfigError, "lowrank"),
    ({"init": "zeros"}, rlrr.ConfigError, "init must be one of"),
])
def test_bad_options_are_refused_before_anything_changes(options, error, match) -> None:
    model = Net()
    with pytest.raises(error, match=match):
        rlrr.apply(model, **options)
    assert not rlrr.adapters_of(model)


def test_config_fields_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        rlrr.RLRRConfig(2)  # positional: reordering fields could never swap options silently


def test_a_non_config_object_is_refused() -> None:
    with pytest.raises(rlrr.ConfigError, match="config must be an RLRRConfig"):
        rlrr.plan(Net(), config={"rank": 2})


@pytest.mark.parametrize("options, resolved", [
    ({}, "paper"),
    ({"scaling": "left"}, "paper"),
    ({"residual": False}, "paper"),
    ({"lowrank": True}, "identity"),
    ({"scaling": "right"}, "identity"),
    ({"lowrank": True, "init": "paper"}, "paper"),
])
def test_each_variant_starts_from_its_documented_init(options, resolved) -> None:
    assert rlrr.RLRRConfig(**options).init == resolved


@pytest.mark.parametrize("options", [{"lowrank": True}, {"scaling": "right"}])
def test_the_ablations_start_at_the_base_model_and_files_record_the_resolved_init(options, tmp_path) -> None:
    torch.manual_seed(0)
    base = Net()
    x = inputs()
    with torch.no_grad():
        expected = base(*x)
    model = rlrr.apply(base, "linear", **options)
    with torch.no_grad():
        got = model(*x)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-6)
    path = rlrr.save_adapter(model, tmp_path / "a.safetensors")
    assert rlrr.read_adapter_file(path).config.init == "identity"


def test_the_shift_rule_is_reported_by_the_plan() -> None:
    plan = rlrr.plan(Net())
    sites = {s.name: s for s in plan.sites}
    assert plan.dropped_shifts == [("conv", "bias-free conv (App. G: Table 12's budgets count no shift there)")]
    assert sites["fc2"].bias_state == "creatable"  # a bias-free nn.Linear gets a shift, created at fold
    assert "no shift (1 sites):" in plan.table()
    assert rlrr.plan(Net(), shift=False).dropped_shifts == []  # the user's choice is not a dropped shift


def test_split_multihead_attention_reports_its_shared_bias() -> None:
    mha = nn.MultiheadAttention(8, 2, kdim=6, vdim=6)
    plan = rlrr.plan(mha)
    dropped = dict(plan.dropped_shifts)
    assert set(dropped) == {"q_proj", "k_proj", "v_proj"}
    assert all("share one in_proj_bias" in why for why in dropped.values())


def test_an_adapter_file_from_before_the_redesign_still_loads(tmp_path) -> None:
    torch.manual_seed(0)
    base = Net()
    model = rlrr.apply(copy.deepcopy(base))
    path = rlrr.save_adapter(model, tmp_path / "new.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    old_sites = [{k: v for k, v in s.items() if k not in ("chunks_from", "bias_note")} for s in json.loads(meta["sites"])]
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={**meta, "sites": json.dumps(old_sites)})
    fresh = rlrr.load_adapter(base, old)
    x = inputs()
    with torch.no_grad():
        for a, b in zip(fresh(*x), model(*x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
