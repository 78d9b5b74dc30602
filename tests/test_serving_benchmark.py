"""The serving benchmark's logic, never its speed: the committed table is what the committed raw
results give, ratios are paired within rounds, and the weight budgets add up from the sizes.

Timing belongs to `python -m benchmarks serving`; here nothing is timed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import measure as M
from benchmarks.serving import BATCH, analyse, markdown

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


@pytest.fixture(scope="module")
def committed() -> dict:
    return json.loads((RESULTS / "serving.json").read_text())


def test_committed_table_is_what_the_committed_raw_results_give(committed):
    assert markdown(committed, analyse(committed)) == (RESULTS / "serving.md").read_text(), (
        "the table is stale: python -m benchmarks.serving --report benchmarks/results/serving.json")


def test_ratios_are_paired_within_rounds(committed):
    wall = committed["timing"]["wall"]
    routed, folded = wall[f"routed4@{BATCH}"], wall[f"folded@{BATCH}"]
    target = next(t for t in analyse(committed)["targets"] if t["target"].startswith("mixed batch of 16 over K = 4"))
    assert target["measured"] == pytest.approx(M.median([a / b for a, b in zip(routed, folded)]))
    assert len(routed) == len(folded) == committed["timing"]["rounds"]


def test_weight_budgets_add_up_from_the_sizes(committed):
    s, a = committed["sizes"], analyse(committed)
    per_task = sum(t["adapter"] + t["head"] for t in s["tasks"])
    assert a["server"]["budget"] == pytest.approx((s["folded_weights"] + per_task) * 1.05)
    assert a["server"]["adapter_inputs"] == s["adapter_inputs_weights"] + sum(x["adapter"] + x["head"] for x in s["onnx_adapters"])
    assert a["server"]["folded_models"] == len(s["tasks"]) * s["folded_weights"]


def test_write_files_gives_adapter_files_any_preset_can_route(tmp_path):
    """`--write-files` for a conv preset: the head is the model's own classifier (`fc`), each file holds it."""
    import rlrr
    from benchmarks.serving import main

    assert main(["--write-files", str(tmp_path), "--preset", "resnet18", "--tasks", "2", "--tiny"]) == 0
    sets = [rlrr.read_adapter_file(tmp_path / f"task{i}.safetensors") for i in range(2)]
    assert (tmp_path / "base.safetensors").is_file()
    heads = [s.trained["fc.weight"].shape[0] for s in sets]
    assert heads == [100, 37]
    assert all(s.metadata["task"] == f"task{i}" for i, s in enumerate(sets))
