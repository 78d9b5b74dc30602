"""Quantized and reduced-precision exports, and saying where a failed check departs.

What is checked:
- INT8 (ONNX, QDQ, per-channel weights) from a calibration folder: the report's agreement, size
  and latency against the fp32 export, the JSON; the calibration layouts (ImageFolder with and
  without splits, VTAB lists, FGVC json) give disjoint calibration and held-out images;
- a real INT8 failure: a hidden channel 300x larger than the others (a rescale RLRR's row and
  column scales can make: fc1's rows up, fc2's columns down) breaks per-tensor activations;
  the localisation names fc2 and `--keep-fp32 blocks.1.mlp.fc2` restores agreement;
- localisation of fp32 failures: an impossible tolerance names the first module; an export that
  drifts inside one submodule is traced to that submodule, in ONNX and in torch.export .pt2;
- the tolerance scaled to a model's own fp32 conditioning (a difference of two large sums);
- bf16 beside fp16 for TorchScript and .pt2;
- bad input (unknown dtype, empty calibration folder, agreement outside [0, 1], a --keep-fp32
  glob that matches nothing, INT8 options without int8, INT8 in TorchScript): exit 2, nothing written;
  the library's QuantOptions refuse the same values with rlrr.ConfigError.

Size caps for CI: the 2-block ViT at 32 px of tests/test_export.py, 16 calibration and 64 held-out inputs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from torch import nn

import rlrr
import zoo
from export.calibration import find_layout
from export.errors import VerificationError
from export.localize import match_modules
from export.onnx import export_onnx
from export.onnx import main as onnx_main
from export.pipeline import ModelSpec
from export.quantize import DEFAULT_MIN_AGREEMENT, agreement
from export.torchscript import export_torchscript
from export.torchscript import main as torchscript_main

TINY_VIT = ModelSpec("vit_tiny_patch16_224", 5, 32, {"depth": 2})
INT8 = {"dtype": "int8", "calibration_images": 16, "eval_images": 64, "batch_sizes": (1, 8), "latency_runs": 0}
QUICK = {"batch_sizes": (1, 3), "inputs_per_batch": 2, "latency_runs": 0}

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def image_folder(root: Path, splits=("train", "test"), classes: int = 3, per_class: int = 8, size: int = 12) -> Path:
    """Class-coloured noisy PNGs: a learnable-looking folder, seeded."""
    rng = np.random.default_rng(0)
    for split in splits:
        for c in range(classes):
            folder = root / split / f"class{c}" if split else root / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                base = np.zeros((size, size, 3)) + 40 + 70 * c
                Image.fromarray((base + rng.normal(0, 30, base.shape)).clip(0, 255).astype("uint8")).save(folder / f"{i}.png")
    return root


def read_report(out: Path) -> dict:
    return json.loads(out.with_name(out.name + ".json").read_text())


# --- INT8 -----------------------------------------------------------------------------------------


def test_int8_export_from_a_calibration_folder_reports_agreement_size_and_latency(tmp_path):
    data = image_folder(tmp_path / "data")
    out = tmp_path / "out" / "vit.int8.onnx"
    out.parent.mkdir()
    report = export_onnx(TINY_VIT, out, calibration=data, min_agreement=0.5, **{**INT8, "latency_runs": 3, "warmup": 1})
    assert report.passed is True and report.dtype == "int8"
    a = report.agreement
    assert a["samples"] == 24 and 0.5 <= a["top1"] <= 1 and a["max_rel"] >= a["mean_rel"] > 0  # test/ split: 3 classes x 8
    q = report.quantization
    assert q["format"] == "QDQ" and "train/" in q["calibration"] and "test/" in q["checked_on"] and not q["random_inputs"]
    assert report.size_bytes < 0.35 * q["fp32_size_bytes"]
    assert report.latency.reference == "fp32 export" and report.latency.base_ms > 0 and report.latency.folded_ms > 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["vit.int8.onnx", "vit.int8.onnx.json"]  # the fp32 file was staged only
    graph = onnx.load(str(out)).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    inits = {i.name: i for i in graph.initializer}
    per_channel = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits and len(inits[n.input[1]].dims) == 1]
    assert per_channel, "weights are quantized per output channel"
    data_json = read_report(out)
    assert data_json["dtype"] == "int8" and data_json["agreement"]["top1"] == a["top1"] and data_json["divergence"] == []
    table = report.table()
    for needle in ("agreement    : top-1", "int8/fp32", "calibration  :", "PASSED"):
        assert needle in table


def test_int8_without_calibration_warns_that_random_inputs_say_little(tmp_path):
    report = export_onnx(TINY_VIT, tmp_path / "r.onnx", min_agreement=0.0, **INT8)
    assert report.quantization["random_inputs"] is True and report.agreement["samples"] == 64
    assert any("RandomCalibrationWarning" in w and "says little" in w for w in report.warnings)


class OneClass(nn.Module):
    """Logits that vary with the input, but class 0 always wins by far: nothing for INT8 to flip."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.fc = nn.Linear(48, 8), nn.Linear(8, 3)  # body: something to adapt; fc: the head
        with torch.no_grad():
            self.fc.bias.copy_(torch.tensor([100.0, 0.0, 0.0]))

    def forward(self, x):
        return self.fc(self.body(x.flatten(1)))


def test_int8_agreement_over_a_single_class_is_called_vacuous(tmp_path):
    report = export_onnx(OneClass(), tmp_path / "o.onnx", input_shape=(3, 4, 4), min_agreement=0.5, **INT8)
    assert report.agreement["classes"] == 1 and report.agreement["top1"] == 1.0
    assert any("VacuousCheckWarning" in w and "same top-1 class" in w for w in report.warnings)


def sensitive_vit() -> nn.Module:
    """A ViT whose block-1 MLP has two hidden channels 300x larger than the rest (ReLU keeps it exact).
    Seeded: how much INT8 loses depends on the draw (44-89 % agreement over six draws here)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, _ = zoo.build_model(TINY_VIT.name, num_classes=5, img_size=32, model_kwargs=TINY_VIT.model_kwargs)
    mlp = model.blocks[1].mlp
    mlp.act = nn.ReLU()
    with torch.no_grad():
        mlp.fc1.weight[7:9] *= 300
        mlp.fc1.bias[7:9] *= 300
        mlp.fc2.weight[:, 7:9] /= 300
    return model.eval()


def test_a_sensitive_layer_fails_int8_is_named_and_keep_fp32_restores_agreement(tmp_path):
    # tolerance 0.2: INT8's error on an ordinary layer depends on the CPU's integer instructions
    # (under 0.1 with AVX512-VNNI, 0.10-0.11 here on an AVX2 EPYC); the sensitive layer's is ~0.8.
    with pytest.raises(VerificationError, match=r"agreement .* < min agreement 90.00%; first divergence: blocks\.1\.mlp\.fc2") as info:
        export_onnx(sensitive_vit(), tmp_path / "s.onnx", input_shape=(3, 32, 32), min_agreement=0.9, tolerance=0.2, **INT8)
    report = info.value.report
    first = report.divergence[0]
    assert first["module"] == "blocks.1.mlp.fc2" and first["max_rel"] > 0.3 and first["tolerance"] == 0.2
    assert all(d["module"] not in ("blocks.0.mlp.fc2", "blocks.1.mlp.fc1") for d in report.divergence)  # nothing before it departs
    assert "try --keep-fp32 blocks.1.mlp.fc2" in report.table() and list(tmp_path.iterdir()) == []
    kept = export_onnx(sensitive_vit(), tmp_path / "k.onnx", input_shape=(3, 32, 32), min_agreement=0.9, tolerance=0.2,
                       keep_fp32=["blocks.1.mlp.fc2"], **INT8)
    assert kept.passed and kept.agreement["top1"] > report.agreement["top1"] + 0.2
    assert kept.quantization["keep_fp32"] == ["blocks.1.mlp.fc2"] and kept.quantization["nodes_kept_fp32"] >= 2


def test_agreement_counts_top1_and_relative_errors_per_sample():
    expected = [[torch.tensor([[1.0, 2.0, 0.0], [4.0, 0.0, 1.0]])]]
    got = [[np.array([[1.0, 2.5, 0.0], [0.0, 4.0, 1.0]], dtype=np.float32)]]
    a = agreement(expected, got, 0.9)
    assert (a["agree"], a["samples"], a["top1"], a["passed"], a["classes"]) == (1, 2, 0.5, False, 2)
    assert a["mean_rel"] == pytest.approx((0.25 + 1.0) / 2) and a["max_rel"] == pytest.approx(1.0)


def test_calibration_layouts_hold_images_out(tmp_path):
    split = find_layout(image_folder(tmp_path / "splits", ("train", "val", "test")), calibration=4, seed=0)
    assert (split.calibration_from, split.evaluation_from) == ("train/", "test/") and len(split.evaluation) == 24
    flat = find_layout(image_folder(tmp_path / "flat", ("",)), calibration=4, seed=0)
    assert len(flat.calibration) == 4 and len(flat.evaluation) == 20
    assert not {p for p, _ in flat.calibration} & {p for p, _ in flat.evaluation}
    vtab = tmp_path / "vtab"
    image_folder(vtab / "images", ("",), classes=2, per_class=3)
    files = sorted((vtab / "images").rglob("*.png"))
    (vtab / "train800.txt").write_text("".join(f"{p.relative_to(vtab)} {i % 2}\n" for i, p in enumerate(files[:4])))
    (vtab / "test.txt").write_text("".join(f"{p.relative_to(vtab)} {i % 2}\n" for i, p in enumerate(files[4:])))
    lists = find_layout(vtab, calibration=8, seed=0)
    assert (lists.form, lists.calibration_from, lists.evaluation_from, len(lists.evaluation)) == ("VTAB-1k lists", "train800.txt", "test.txt", 2)
    (vtab / "train.json").write_text(json.dumps({str(p.relative_to(vtab / "images")): 1 for p in files[:5]}))
    (vtab / "test.json").write_text(json.dumps({str(files[5].relative_to(vtab / "images")): 0}))
    for name in ("train800.txt", "test.txt"):
        (vtab / name).unlink()
    fgvc = find_layout(vtab, calibration=8, seed=0)
    assert fgvc.form == "FGVC json" and len(fgvc.calibration) == 5 and fgvc.evaluation == [(files[5], 0)]


def test_keep_fp32_globs_match_a_module_or_its_parents():
    names = ["blocks.0.mlp", "blocks.0.mlp.fc2", "blocks.1.mlp.fc2", "head"]
    assert match_modules(["blocks.*.mlp.fc2", "blocks.0.mlp", "nothing"], names) == {
        "blocks.*.mlp.fc2": ["blocks.0.mlp.fc2", "blocks.1.mlp.fc2"], "blocks.0.mlp": ["blocks.0.mlp", "blocks.0.mlp.fc2"], "nothing": []}


# --- localisation of fp32 failures, and the conditioning-scaled tolerance ----------------------


class DriftingLinear(nn.Linear):
    """A linear layer that computes something else when exported (the bug verification exists for)."""

    def forward(self, x):
        y = super().forward(x)
        return y * 1.01 if torch.compiler.is_exporting() else y


class DriftsInside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.body, self.mid, self.head = nn.LayerNorm(12), nn.Linear(12, 12), DriftingLinear(12, 12), nn.Linear(12, 4)

    def forward(self, x):
        return self.head(torch.relu(self.mid(torch.relu(self.body(self.norm(x.flatten(1)))))))


def test_an_impossible_tolerance_fails_and_names_the_first_module(tmp_path):
    out = tmp_path / "vit.onnx"
    with pytest.raises(VerificationError, match="first divergence: patch_embed.proj, rel err") as info:
        export_onnx(TINY_VIT, out, tolerance=1e-12, keep_on_fail=True, **QUICK)
    data = read_report(out)
    assert data["passed"] is False and data["conditioning"] is None  # an explicit tolerance is taken as given
    assert data["divergence"][0]["module"] == "patch_embed.proj" and data["divergence"][0]["tolerance"] == 1e-12
    modules = [d["module"] for d in data["divergence"]]
    assert modules.index("blocks.0.attn.qkv") < modules.index("blocks.1.mlp.fc2") < modules.index("head")  # execution order
    assert data["localisation"]["modules_compared"] >= 20


def test_a_failed_fp16_check_is_localised_too(tmp_path):
    with pytest.raises(VerificationError, match="first divergence: ") as info:
        export_onnx(TINY_VIT, tmp_path / "h.onnx", dtype="fp16", tolerance=1e-7, **QUICK)
    report = info.value.report
    assert report.dtype == "fp16" and report.divergence and report.divergence[0]["tolerance"] == 1e-7
    assert all(d["max_rel"] > 1e-7 for d in report.divergence) and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix", [".onnx", ".pt2"])
def test_an_export_that_drifts_inside_a_module_is_traced_to_it(suffix, tmp_path):
    export = export_onnx if suffix == ".onnx" else export_torchscript
    with pytest.raises(VerificationError) as info:
        export(DriftsInside(), tmp_path / f"d{suffix}", input_shape=(3, 2, 2), **QUICK)
    report = info.value.report
    assert [d["module"] for d in report.divergence] == ["mid", "head"]
    assert report.divergence[0]["max_rel"] == pytest.approx(0.01, rel=0.05)
    assert "first divergence: mid, rel err 1.0e-02" in report.table()


class Cancels(nn.Module):
    """head(a(x) - b(x)) with b's weights within 0.3 % of a's: the difference of two large sums, so
    float32 rounding in either sum is amplified several hundred times (ill-conditioned by design)."""

    def __init__(self, width: int = 3 * 32 * 32) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a, self.b, self.head = nn.Linear(width, 64), nn.Linear(width, 64), nn.Linear(64, 3)
        with torch.no_grad():
            self.a.weight.copy_(torch.randn(64, width, generator=g))
            self.b.weight.copy_(self.a.weight + 3e-3 * torch.randn(64, width, generator=g))
            self.a.bias.zero_()
            self.b.bias.zero_()
            self.head.weight.copy_(torch.randn(3, 64, generator=g))
            self.head.bias.zero_()
        rlrr.apply(self, init="identity", trainable="head")  # its own adapter, the identity: the cancellation stays

    def forward(self, x):
        x = x.flatten(1)
        return self.head(self.a(x) - self.b(x))


def test_an_ill_conditioned_model_passes_within_its_own_fp32_error_and_the_report_says_so(tmp_path):
    report = export_onnx(Cancels(), tmp_path / "c.onnx", input_shape=(3, 32, 32), **QUICK)
    c = report.conditioning
    assert report.passed and report.outputs[0].max_rel > 1e-4, "onnxruntime lands past the fixed tolerance"
    assert c["fixed_tolerance"] == 1e-4 and c["tolerance"] == report.tolerance == pytest.approx(c["factor"] * c["fp32_vs_fp64"]["output"])
    assert "tolerance scaled to the model's own fp32 error" in report.table()
    with pytest.raises(VerificationError, match="first divergence: head"):  # an explicit tolerance is taken as given
        export_onnx(Cancels(), tmp_path / "e.onnx", input_shape=(3, 32, 32), tolerance=1e-4, **QUICK)


# --- bf16 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
def test_bf16_torchscript_and_torch_export(suffix, tmp_path):
    out = tmp_path / f"vit{suffix}"
    report = export_torchscript(TINY_VIT, out, dtype="bf16", **QUICK)
    assert report.passed and report.tolerance == 5e-2 and 1e-4 < report.outputs[0].max_rel < 5e-2
    loaded = torch.export.load(str(out)).module() if suffix == ".pt2" else torch.jit.load(str(out))
    assert next(loaded.parameters()).dtype == torch.bfloat16


# --- bad input: exit 2, nothing written -----------------------------------------------------------

TINY_ARGS = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--model-kwargs", '{"depth": 1}', "--num-classes", "3", "-q"]


@pytest.mark.parametrize(
    ("main", "args", "needle"),
    [
        (onnx_main, ["--dtype", "int4"], "invalid choice: 'int4'"),
        (onnx_main, ["--dtype", "int8", "--min-agreement", "1.5"], "within [0, 1]"),
        (onnx_main, ["--dtype", "int8", "--min-agreement", "nan"], "within [0, 1]"),
        (onnx_main, ["--dtype", "int8", "--calibration-images", "0"], "calibration images must be a whole number from 1"),
        (onnx_main, ["--dtype", "int8", "--calibration", "EMPTY"], "holds no images"),
        (onnx_main, ["--dtype", "int8", "--keep-fp32", "blocks.9.*"], "--keep-fp32 'blocks.9.*' matches no module"),
        (onnx_main, ["--keep-fp32", "head"], "--keep-fp32 is for --dtype int8 only"),
        (onnx_main, ["--dtype", "bf16"], "onnx export writes fp32, fp16, int8, not bf16"),
        (torchscript_main, ["--dtype", "int8"], "INT8 is ONNX's"),
    ],
)
def test_cli_bad_quantization_input_exits_2_and_writes_nothing(main, args, needle, tmp_path, capsys):
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "EMPTY" / "notes.txt").write_text("no images here")
    args = [str(tmp_path / "EMPTY") if a == "EMPTY" else a for a in args]
    out = tmp_path / "out"
    out.mkdir()
    try:
        status = main([*TINY_ARGS, "--out", str(out / "m.onnx"), *args])
    except SystemExit as e:  # argparse's own checks
        status = e.code
    assert status == 2
    assert needle in capsys.readouterr().err
    assert list(out.iterdir()) == []


@pytest.mark.parametrize(("options", "needle"), [
    ({"min_agreement": float("nan")}, "within [0, 1]"), ({"min_agreement": "0.9"}, "within [0, 1]"),
    ({"eval_images": 0}, "held-out images must be"), ({"keep_fp32": "head"}, "takes non-empty module-name patterns"),
    ({"calibration": ""}, "empty path"),
])
def test_quant_options_refuse_bad_values_with_config_error(options, needle):
    from export.quantize import QuantOptions

    with pytest.raises(rlrr.ConfigError, match=re.escape(needle)):
        QuantOptions(**options)


def test_int8_options_without_int8_are_refused(tmp_path):
    with pytest.raises(rlrr.ConfigError, match="are for dtype='int8' only"):
        export_onnx(TINY_VIT, tmp_path / "m.onnx", keep_fp32=["head"], **QUICK)
    assert list(tmp_path.iterdir()) == []


def test_the_default_min_agreement_is_documented():
    assert 0.9 <= DEFAULT_MIN_AGREEMENT <= 1.0
    docs = (Path(__file__).resolve().parents[1] / "docs" / "export.md").read_text()
    assert f"{DEFAULT_MIN_AGREEMENT:g}" in docs and "--min-agreement" in docs


# --- the benchmark's task and tables ---------------------------------------------------------------


def test_committed_quantize_table_is_what_its_json_gives():
    from benchmarks.quantize import RESULTS, markdown

    doc = json.loads((RESULTS / "quantize.json").read_text())
    assert markdown(doc) == (RESULTS / "quantize.md").read_text(), "stale: rerun python -m benchmarks.quantize"
