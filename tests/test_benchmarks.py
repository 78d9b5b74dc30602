"""The benchmark's logic, never its speed: the variants train what they say, ratios are paired,
and the committed tables are what the committed raw results give.

Timing belongs to `python -m benchmarks`; here nothing is timed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import measure as M
from benchmarks import variants as V
from benchmarks.report import analyse, markdown

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


@pytest.fixture(scope="module")
def committed() -> dict:
    doc = json.loads((RESULTS / "benchmark.json").read_text())
    doc.pop("analysis", None)
    return doc


def test_committed_markdown_is_what_the_committed_raw_results_give(committed):
    assert markdown(committed, analyse(committed)) == (RESULTS / "benchmark.md").read_text(), (
        "the table is stale: python -m benchmarks.report benchmarks/results/benchmark.json")


def test_targets_use_paired_ratios_of_the_raw_rounds(committed):
    timing = next(t for t in committed["tasks"] if t["spec"]["task"] == "train_timing" and t["model"] == "vit_b16")
    rlrr, lora = timing["variants"]["rlrr"]["wall"], timing["variants"]["lora_r8"]["wall"]
    target = next(t for t in analyse(committed)["targets"] if t["target"] == "ViT-B/16 training step, RLRR / PEFT LoRA r=8")
    ratios = sorted(a / b for a, b in zip(rlrr, lora))
    assert target["measured"] == pytest.approx((ratios[2] + ratios[3]) / 2)  # six rounds: the middle two
    assert len(rlrr) == len(lora) == 6


def test_paired_ratio_takes_the_ratio_within_each_round():
    # the load doubles in round 2: unpaired medians would mix rounds, paired ratios stay at 1.1
    r = M.paired_ratio([1.1, 2.2, 1.1], [1.0, 2.0, 1.0])
    assert r["median"] == pytest.approx(1.1) and r["min"] == pytest.approx(1.1) and r["max"] == pytest.approx(1.1) and r["n"] == 3


@pytest.mark.parametrize(
    ("variant", "trainable"),
    [
        ("full", None),  # every parameter
        ("linear_probe", {"head.weight", "head.bias"}),
        ("dense_floor", {"pos_embed"}),
        ("rlrr", None),
        ("rlrr_linears", None),
        ("ssf", None),
    ],
)
def test_variants_train_what_they_say(committed, variant, trainable):
    model = V.TRAIN_VARIANTS[variant](V.build("vit_s16"))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    if trainable is not None:
        assert names == trainable
    if variant.startswith("rlrr"):
        assert {"head.weight", "head.bias"} <= names
        assert all(n.startswith("head.") or ".rlrr_" in n for n in names)
        linears = [n for n in names if n.endswith("rlrr_s_left")]
        assert len(linears) == 4 * 12  # qkv, proj, fc1, fc2 of 12 blocks
        norms = [n for n in names if "norm" in n.split(".parametrizations")[0] and n.endswith("rlrr_scale")]
        assert len(norms) == (25 if variant == "rlrr" else 0)  # 2 a block + the final norm
    if variant == "ssf":
        assert all(n.startswith("head.") or n.endswith(("ssf_scale", "ssf_shift")) for n in names)
    timing = next(t for t in committed["tasks"] if t["spec"]["task"] == "train_timing" and t["model"] == "vit_s16")
    assert V.trainable_parameters(model) == timing["variants"][variant]["trainable_params"]


def test_rlrr_variants_differ_only_in_the_path(committed):
    """The parametrize ablation computes the same step as the fused RLRR variant."""
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 224, 224), torch.randint(0, V.NUM_CLASSES, (2,))
    grads = []
    for variant in ("rlrr", "rlrr_parametrize"):
        torch.manual_seed(1)
        model = V.TRAIN_VARIANTS[variant](V.build("vit_s16"))
        torch.nn.functional.cross_entropy(model(x), y).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6, msg=n)


def test_lora_variant_targets_the_same_linears(committed):
    pytest.importorskip("peft")  # the `bench` extra
    model = V.lora(V.build("vit_s16"))
    adapted = {n.rsplit(".lora_A", 1)[0].split("base_model.model.", 1)[1] for n, _ in model.named_parameters() if ".lora_A" in n}
    assert len(adapted) == 48 and all(n.split(".")[-1] in ("qkv", "proj", "fc1", "fc2") and n.startswith("blocks.") for n in adapted)
    timing = next(t for t in committed["tasks"] if t["spec"]["task"] == "train_timing" and t["model"] == "vit_s16")
    assert V.trainable_parameters(model) == timing["variants"]["lora_r8"]["trainable_params"]
