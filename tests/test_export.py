"""The deployment path: fold, export (ONNX, TorchScript, torch.export), verify, and the CLIs.

What is checked:
- the smallest timm ViT, Swin, ConvNeXt and ResNet and torchvision ViT and ResNet, with seeded
  random non-zero adapters (rank 2 with fused q/k/v chunks on both ViTs), export to ONNX with a
  dynamic batch axis and match the *unmerged* model in onnxruntime at two batch sizes; fp16 and
  ONNX external data on one model each; the report and its JSON;
- TorchScript (`torch.jit.trace`) and `torch.export` (.pt2), reloaded and verified;
- verification is not vacuous: a model whose export differs from eager fails, and nothing is
  written unless asked;
- the error paths (unknown model, weights, adapter for another model, output paths, missing
  runtime) in-process and through `python -m export.onnx` in subprocesses, with exit statuses.

Size caps for CI (2 CPU cores): export time grows with the number of blocks, so the models keep
their smallest family config but with fewer blocks and 32 px inputs (MODEL_CASES); the full-size
figures come from running the CLI by hand (docs/export.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import onnx
import pytest
import torch
import torchvision
from torch import nn

import rlrr
import zoo
from export.adapt import random_adapter, read_metadata, save_export_adapter
from export.errors import MissingRuntimeError, OutputError, VerificationError
from export.files import Staging
from export.onnx import export_onnx
from export.onnx import main as onnx_main
from export.pipeline import ModelSpec, _build, resolve_spec
from export.torchscript import export_torchscript
from export.torchscript import main as torchscript_main
from export.verify import compare, provider_list, sample_independent
from export.wake import wake
from zoo.models import suggest

ROOT = Path(__file__).resolve().parents[1]
FAST = {"batch_sizes": (1, 3), "inputs_per_batch": 2, "latency_runs": 0}
TINY_VIT_KWARGS = {"depth": 2}  # reason: CI time; 2 blocks hold every op type of the 12-block model
# name: (spec, export options) -- smallest family configs, fewer blocks, 32 px
TINY_VIT = ModelSpec("vit_tiny_patch16_224", 5, 32, TINY_VIT_KWARGS)  # exported with rank 2 and latency below
MODEL_CASES = {
    "timm_swin": (ModelSpec("swin_tiny_patch4_window7_224", 5, 32, {"window_size": 2, "depths": (1, 1), "num_heads": (1, 2), "embed_dim": 16}), {}),
    "timm_convnext": (ModelSpec("convnext_atto", 5, 32, {"depths": (1, 1, 1, 1)}), {"dtype": "fp16"}),
    "timm_resnet": (ModelSpec("resnet18", 5, 32, {"layers": (1, 1, 1, 1)}), {}),
    "tv_resnet": (ModelSpec("torchvision:resnet18", 5, 32), {}),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def tv_tiny_vit() -> nn.Module:
    """torchvision's ViT (nn.MultiheadAttention, fused in_proj) at its smallest (zero-initialised head)."""
    return torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=5)


def onnx_batch_dim(path: Path) -> str:
    graph = onnx.load(str(path), load_external_data=False).graph
    return graph.input[0].type.tensor_type.shape.dim[0].dim_param


def assert_verified(report, out: Path, extra: tuple[str, ...] = ()) -> None:
    assert report.passed is True, report.table()
    assert all(o.max_rel <= report.tolerance and o.finite for o in report.outputs)
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([out.name, out.name + ".json", *extra])  # nothing else left
    data = json.loads((out.parent / (out.name + ".json")).read_text())
    assert data["passed"] is True and data["verified"] is True
    assert data["parameters"]["folded"] == data["parameters"]["base"] + data["parameters"]["created"]
    assert data["parameters"]["adapted"] == data["parameters"]["base"] + data["parameters"]["adapter"] > data["parameters"]["base"]
    assert data["size_bytes"] == sum((out.parent / f).stat().st_size for f in [out.name, *extra])


# --- every model family through ONNX ---------------------------------------------------------


@pytest.mark.parametrize("case", MODEL_CASES)
def test_onnx_export_matches_the_unmerged_model(case, tmp_path):
    spec, options = MODEL_CASES[case]
    out = tmp_path / f"{case}.onnx"
    report = export_onnx(spec, out, **{**FAST, **options})
    assert_verified(report, out)
    assert onnx_batch_dim(out), "the batch axis must be dynamic"
    assert report.batch_sizes == [1, 3] and report.adapter["origin"] == "random"
    assert report.adapter["config"]["rank"] == options.get("rank", 1)
    assert report.runtime["providers"][0] in ("CPUExecutionProvider", "CUDAExecutionProvider")
    assert report.tolerance == (1e-2 if options.get("dtype") == "fp16" else 1e-4)


def test_vit_rank2_fused_qkv_latency_and_table(tmp_path):
    model, _ = zoo.build_model(TINY_VIT.name, num_classes=5, img_size=32, model_kwargs=TINY_VIT_KWARGS)
    qkv = [s for s in rlrr.plan(model, rank=2).sites if s.name.endswith("attn.qkv")]
    assert qkv and all(s.chunks == 3 for s in qkv)  # one S_left per q, k, v chunk
    out = tmp_path / "vit.onnx"
    report = export_onnx(TINY_VIT, out, rank=2, batch_sizes=(2, 5), inputs_per_batch=2, latency_runs=3, warmup=1)
    assert_verified(report, out)
    assert onnx_batch_dim(out) and report.batch_sizes == [2, 5]
    assert report.adapter["config"]["fused_chunks"] is True and report.adapter["config"]["rank"] == 2
    lat = report.latency
    assert lat.base_ms > 0 and lat.folded_ms > 0 and lat.ratio == pytest.approx(lat.folded_ms / lat.base_ms)
    table = report.table()
    for needle in ("max rel err", "tolerance", "folded/base", "random adapter, seed 0", "PASSED"):
        assert needle in table
    assert json.loads((tmp_path / "vit.onnx.json").read_text())["latency"]["ratio"] == pytest.approx(lat.ratio)


def test_torchvision_vit_module_rank2_with_external_data(tmp_path):
    model = tv_tiny_vit()
    in_proj = [s for s in rlrr.plan(model, rank=2).sites if s.weight == "in_proj_weight"]
    assert in_proj and all(s.chunks == 3 for s in in_proj)
    out = tmp_path / "tv_vit.onnx"
    report = export_onnx(model, out, input_shape=(3, 32, 32), rank=2, external_data="yes", **FAST)
    assert_verified(report, out, extra=("tv_vit.onnx.data",))
    assert not rlrr.adapters_of(model), "a plain module given is left as it was (a copy is adapted)"
    assert onnx_batch_dim(out)


def test_a_zero_head_makes_the_report_warn_that_the_check_is_vacuous(tmp_path):
    model = tv_tiny_vit()  # torchvision zero-initialises the head: every output is the same
    rlrr.apply(model, trainable="heads")  # the model's own adapter is exported as it is
    report = export_onnx(model, tmp_path / "zero_head.onnx", input_shape=(3, 32, 32), **FAST)
    assert report.passed is True  # it passes whatever the weights: hence the warning
    assert any("VacuousCheckWarning" in w and "same for every input sample" in w for w in report.warnings), report.warnings
    assert "same for every input sample" in report.table()
    report = export_onnx(tv_tiny_vit(), tmp_path / "random.onnx", input_shape=(3, 32, 32), **FAST)  # the random adapter wakes the head
    assert not any("VacuousCheckWarning" in w for w in report.warnings), report.warnings


def test_sample_independent_finds_outputs_equal_for_every_sample():
    varying, constant = torch.randn(3, 4), torch.tensor([1.0, 2.0]).expand(3, 2)
    expected = [[varying, constant], [torch.randn(1, 4), torch.tensor([[1.0, 2.0]])]]
    assert sample_independent(expected, ["a", "b"]) == ["b"]
    assert sample_independent([[torch.ones(1, 4)]], ["a"]) == []  # one sample in all: cannot tell


def test_an_adapted_model_is_exported_and_left_as_it_was(tmp_path):
    model = tv_tiny_vit().eval()
    random_adapter(model, seed=3)
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    out = tmp_path / "adapted.pt"
    report = export_torchscript(model, out, input_shape=(3, 32, 32), batch_sizes=(1, 2), inputs_per_batch=1, latency_runs=2, warmup=1)
    assert_verified(report, out)
    assert report.adapter["origin"] == "model" and len(rlrr.adapters_of(model)) == report.adapter["sites"]
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)  # still adapted, still trainable
    assert report.latency.base_ms is None and "already adapted" in report.latency.note


# --- TorchScript and torch.export ------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
def test_torchscript_and_torch_export_reload_and_verify(suffix, tmp_path):
    out = tmp_path / f"vit{suffix}"
    report = export_torchscript(TINY_VIT, out, rank=2, batch_sizes=(1, 3), inputs_per_batch=2, latency_runs=2, warmup=1)
    assert_verified(report, out)
    assert report.format == ("pt2" if suffix == ".pt2" else "torchscript")
    loaded = torch.export.load(str(out)).module() if suffix == ".pt2" else torch.jit.load(str(out))
    assert loaded(torch.randn(4, 3, 32, 32)).shape == (4, 5)  # dynamic batch, reloaded by the user's way


# --- verification is not vacuous --------------------------------------------------------------


class Drifting(nn.Module):
    """Computes one thing eagerly and another when exported: the kind of bug verification is for."""

    def __init__(self, num_classes: int = 4, drift: float = 0.5) -> None:
        super().__init__()
        self.norm, self.body, self.head = nn.LayerNorm(12), nn.Linear(12, 12), nn.Linear(12, num_classes)
        self.drift = drift

    def forward(self, x):
        y = self.head(torch.relu(self.body(self.norm(x.flatten(1)))))
        return y + self.drift if torch.compiler.is_exporting() else y


def test_a_mismatch_fails_and_writes_nothing(tmp_path):
    out = tmp_path / "drift.onnx"
    with pytest.raises(VerificationError, match="max rel error .* > tolerance .*nothing written") as info:
        export_onnx(Drifting(), out, input_shape=(3, 2, 2), **FAST)
    report = info.value.report
    assert report.passed is False and not report.kept and report.outputs[0].max_rel > 1e-2
    assert "FAIL" in report.table()
    assert list(tmp_path.iterdir()) == []


def test_keep_on_fail_keeps_the_file_and_its_report(tmp_path):
    out = tmp_path / "drift.onnx"
    with pytest.raises(VerificationError, match="file kept"):
        export_onnx(Drifting(), out, input_shape=(3, 2, 2), keep_on_fail=True, **FAST)
    assert out.is_file() and json.loads((tmp_path / "drift.onnx.json").read_text())["passed"] is False


def test_compare_is_relative_to_the_output_scale():
    expected = [[torch.tensor([[1000.0, 1e-3]])]]
    (check,) = compare(expected, [[torch.tensor([[1000.0, 2e-3]])]], ["output"])
    assert check.max_abs == pytest.approx(1e-3) and check.max_rel == pytest.approx(1e-6)  # elementwise would say 1.0
    (bad,) = compare(expected, [[torch.tensor([[float("nan"), 0.0]])]], ["output"])
    assert not bad.passed(1.0)


def test_random_adapter_is_seeded_and_non_zero():
    a, b = (random_adapter(tv_tiny_vit(), seed=1, rank=2) for _ in range(2))
    pa = {n: p for n, p in a.named_parameters() if "rlrr_" in n}
    assert pa and all(bool((p != 0).all()) for p in pa.values())
    assert all(torch.equal(p, dict(b.named_parameters())[n]) for n, p in pa.items())


# --- bad input, in-process ---------------------------------------------------------------------


def test_unknown_model_suggests_near_names():
    with pytest.raises(zoo.UnknownModelError, match="vit_tiny_patch16_224") as info:
        zoo.build_model("vit_tiny_patch16_2244")
    assert isinstance(info.value, rlrr.RLRRError) and isinstance(info.value, ValueError)
    assert "resnet50" in suggest("resnet5O")
    with pytest.raises(zoo.UnknownModelError, match="cannot be imported"):
        zoo.build_model("no_such_package_xyz:build")


def test_weights_strict_keys_name_the_mismatch(tmp_path):
    model, _ = zoo.build_model("resnet18", num_classes=5, model_kwargs={"layers": (1, 1, 1, 1)})
    state = model.state_dict()
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, tmp_path / "wrapped.pth")
    assert zoo.load_into(model, tmp_path / "wrapped.pth") == []  # a checkpoint wrapper and DDP prefix are fine
    broken = dict(state)
    broken.pop("conv1.weight")
    broken["extra.weight"] = torch.zeros(1)
    broken["layer1.0.conv1.weight"] = torch.zeros(1)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(zoo.WeightsMismatchError) as info:
        zoo.load_into(model, tmp_path / "broken.pth")
    assert isinstance(info.value, ValueError)
    assert "conv1.weight" in str(info.value) and "extra.weight" in str(info.value) and "layer1.0.conv1.weight" in str(info.value)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(zoo.WeightsFileError, match="cannot read") as info:
        zoo.load_into(model, tmp_path / "junk.pth")
    assert isinstance(info.value, ValueError)  # bad weights are a ValueError, missing or unreadable as well


def test_weights_with_another_head_keep_the_new_head(tmp_path):
    thousand, _ = zoo.build_model("resnet18", num_classes=1000, model_kwargs={"layers": (1, 1, 1, 1)})
    torch.save(thousand.state_dict(), tmp_path / "in1k.pth")
    model, _ = zoo.build_model("resnet18", num_classes=5, model_kwargs={"layers": (1, 1, 1, 1)})
    with pytest.warns(UserWarning, match="head"):
        notes = zoo.load_into(model, tmp_path / "in1k.pth")
    assert zoo.classifier_name(model) == "fc" and any("fc.weight" in n for n in notes)
    assert torch.equal(model.conv1.weight, thousand.conv1.weight)
    # the export report carries it as a note of the base weights
    built, info = _build(ModelSpec("resnet18", 5, 32, {"layers": (1, 1, 1, 1)}, tmp_path / "in1k.pth"), seed=0)
    assert torch.equal(built.conv1.weight, thousand.conv1.weight) and info.weights == str(tmp_path / "in1k.pth")
    assert len(info.notes) == 1 and "fc.weight" in info.notes[0] and "fresh initialisation" in info.notes[0]


def test_classifier_head_is_found_and_a_headless_model_has_none():
    assert zoo.classifier_name(zoo.build_model("convnext_atto", num_classes=3)[0]) == "head.fc"
    assert zoo.classifier_name(tv_tiny_vit()) == "heads.head"
    assert zoo.classifier_name(zoo.build_model("resnet18", num_classes=0, model_kwargs={"layers": (1, 1, 1, 1)})[0]) is None


def test_wake_redraws_zero_initialised_tensors():
    model, _ = zoo.build_model("resnet18", num_classes=5, model_kwargs={"layers": (1, 1, 1, 1)})
    assert bool((model.layer1[0].bn2.weight == 0).all())  # timm's zero_init_last
    assert "layer1.0.bn2.weight" in wake(model, seed=0)
    assert bool((model.layer1[0].bn2.weight != 0).all())


def test_output_checks(tmp_path):
    source = tmp_path / "adapter.safetensors"
    source.write_bytes(b"x")
    with pytest.raises(OutputError, match="does not exist"):
        Staging(tmp_path / "missing" / "m.onnx")
    with pytest.raises(OutputError, match="never overwritten"):
        Staging(source, inputs=[source], force=True)
    (tmp_path / "m.onnx").write_bytes(b"old")
    with pytest.raises(OutputError, match="--force"):
        Staging(tmp_path / "m.onnx")
    with pytest.raises(KeyboardInterrupt), Staging(tmp_path / "m.onnx", force=True) as staging:
        staging.path("m.onnx").write_bytes(b"half")
        raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors", "m.onnx"]
    assert (tmp_path / "m.onnx").read_bytes() == b"old"


def test_adapter_metadata_builds_the_model_and_conflicts_are_errors(tmp_path):
    model, _ = zoo.build_model("vit_tiny_patch16_224", num_classes=5, img_size=32, model_kwargs=TINY_VIT_KWARGS)
    random_adapter(model)
    path = save_export_adapter(model, tmp_path / "a.safetensors", model_name="vit_tiny_patch16_224", num_classes=5, img_size=32, model_kwargs=TINY_VIT_KWARGS)
    assert read_metadata(path) == {"model": "vit_tiny_patch16_224", "num_classes": 5, "img_size": 32, "model_kwargs": TINY_VIT_KWARGS}
    spec = resolve_spec(None, adapter=path, num_classes=None)
    assert (spec.name, spec.num_classes, spec.img_size, spec.model_kwargs) == ("vit_tiny_patch16_224", 5, 32, TINY_VIT_KWARGS)
    assert resolve_spec("timm:vit_tiny_patch16_224", adapter=path, img_size=64).img_size == 64  # flags override
    with pytest.raises(rlrr.AdapterMismatchError, match="made for 'vit_tiny_patch16_224'"):
        resolve_spec("resnet18", adapter=path)
    rlrr.save_adapter(model, tmp_path / "plain.safetensors")
    with pytest.raises(rlrr.ConfigError, match="pass --model"):
        resolve_spec(None, adapter=tmp_path / "plain.safetensors")


def test_cuda_provider_missing_says_how_to_install():
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    with pytest.raises(MissingRuntimeError, match=r"rlrr\[gpu\]"):
        provider_list("cuda")
    assert provider_list("auto")[0] == ["CPUExecutionProvider"]


# --- the CLIs end to end, in subprocesses ------------------------------------------------------

HELPERS = '''
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self, num_classes=4, drift=0.0):
        super().__init__()
        self.norm, self.body, self.head = nn.LayerNorm(12), nn.Linear(12, 12), nn.Linear(12, num_classes)
        self.drift = drift

    def forward(self, x):
        y = self.head(torch.relu(self.body(self.norm(x.flatten(1)))))
        return y + self.drift if self.drift and torch.compiler.is_exporting() else y


@torch.library.custom_op("rlrr_test::twist", mutates_args=())
def twist(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1).clone()


@twist.register_fake
def _(x):
    return torch.empty_like(x)


class Twisted(Tiny):
    def forward(self, x):
        return torch.ops.rlrr_test.twist(super().forward(x))


def tiny(num_classes=4):
    return Tiny(num_classes)


def drifting(num_classes=4):
    return Tiny(num_classes, drift=0.5)


def twisted(num_classes=4):
    return Twisted(num_classes)
'''

QUICK = ["--batch-sizes", "1,2", "--inputs", "1", "--latency-runs", "0", "-q"]
TINY = ["--model", "cli_helpers:tiny", "--img-size", "2"]


def _cli_cases(d: Path) -> dict[str, tuple[str, list[str], dict]]:
    """name -> (module, arguments, extra environment); every case runs in its own folder d/name."""
    vit, plain = str(d / "vit.safetensors"), str(d / "resnet_plain.safetensors")
    unwritable = "/proc" if os.geteuid() == 0 else str(d / "readonly")  # root ignores chmod
    no_ort = {"PYTHONPATH_EXTRA": str(d / "no_onnxruntime")}
    return {
        "adapter_file": ("export.onnx", ["--adapter", vit, "--out", "m.onnx", "--batch-sizes", "1,2", "--inputs", "1", "--latency-runs", "2", "--warmup", "1"], {}),
        "torchscript": ("export.torchscript", ["--adapter", vit, "--out", "m.pt", *QUICK], {}),
        "mismatch": ("export.onnx", ["--model", "cli_helpers:drifting", "--img-size", "2", "--out", "m.onnx", *QUICK], {}),
        "unknown_model": ("export.onnx", ["--model", "vit_tiny_patch16_2244", "--out", "m.onnx", *QUICK], {}),
        "foreign_adapter": ("export.onnx", [*TINY, "--adapter", plain, "--out", "m.onnx", *QUICK], {}),
        "conflicting_model": ("export.onnx", [*TINY, "--adapter", vit, "--out", "m.onnx", *QUICK], {}),
        "bad_weights": ("export.onnx", [*TINY, "--weights", str(d / "junk.pth"), "--out", "m.onnx", *QUICK], {}),
        "missing_folder": ("export.onnx", [*TINY, "--out", "nowhere/m.onnx", *QUICK], {}),
        "unwritable_folder": ("export.onnx", [*TINY, "--out", f"{unwritable}/m.onnx", *QUICK], {}),
        "unsupported_op": ("export.onnx", ["--model", "cli_helpers:twisted", "--img-size", "2", "--out", "m.onnx", *QUICK], {}),
        "existing_output": ("export.onnx", [*TINY, "--out", str(d / "existing.onnx"), *QUICK], {}),
        "output_is_input": ("export.onnx", ["--adapter", vit, "--out", vit, "--force", *QUICK], {}),
        "no_runtime": ("export.onnx", [*TINY, "--out", "m.onnx", *QUICK], no_ort),
        "no_runtime_no_verify": ("export.onnx", [*TINY, "--out", "m.onnx", "--no-verify", *QUICK], no_ort),
    }


@pytest.fixture(scope="module", autouse=True)
def _cli_runs(request, tmp_path_factory):
    """Start every CLI case in the background (three at a time) as soon as this module starts,
    so the subprocesses overlap the in-process tests; only when some CLI test is selected."""
    if not any(item.name.startswith("test_cli") and item.module is request.module for item in request.session.items):
        yield None
        return
    d = tmp_path_factory.mktemp("cli")
    (d / "helpers").mkdir()
    (d / "helpers" / "cli_helpers.py").write_text(textwrap.dedent(HELPERS))
    (d / "no_onnxruntime" / "onnxruntime").mkdir(parents=True)
    (d / "no_onnxruntime" / "onnxruntime" / "__init__.py").write_text("raise ImportError('onnxruntime hidden by the test')\n")
    (d / "junk.pth").write_bytes(b"\x00garbage, not a checkpoint")
    (d / "existing.onnx").write_bytes(b"precious")
    (d / "readonly").mkdir(mode=0o500)
    model, _ = zoo.build_model(TINY_VIT.name, num_classes=5, img_size=32, model_kwargs=TINY_VIT_KWARGS)
    random_adapter(model, rank=2)
    save_export_adapter(model, d / "vit.safetensors", model_name=TINY_VIT.name, num_classes=5, img_size=32, model_kwargs=TINY_VIT_KWARGS)
    resnet, _ = zoo.build_model("resnet18", num_classes=4, model_kwargs={"layers": (1, 1, 1, 1)})
    rlrr.save_adapter(random_adapter(resnet), d / "resnet_plain.safetensors")
    digest = hashlib.sha256((d / "vit.safetensors").read_bytes()).hexdigest()

    def run(name, module, args, env):
        folder = d / name
        folder.mkdir()
        paths = [env.get("PYTHONPATH_EXTRA"), str(ROOT), str(d / "helpers"), os.environ.get("PYTHONPATH")]
        full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, "-m", module, *args], cwd=folder, env=full_env, capture_output=True, text=True, timeout=600)
        return done, folder

    pool = ThreadPoolExecutor(max_workers=3)
    futures = {name: pool.submit(run, name, *case) for name, case in _cli_cases(d).items()}
    yield futures, digest, d
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def cli(_cli_runs):
    """name -> (CompletedProcess, its folder), once every CLI case has finished."""
    futures, digest, d = _cli_runs
    results = {name: f.result() for name, f in futures.items()}
    results["_vit_digest"] = (digest, d)
    return results


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("main", [onnx_main, torchscript_main])
def test_cli_help_documents_the_flags(main, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--weights", "--adapter", "--out", "--no-verify", "--keep-on-fail", "--tolerance", "exit status"):
        assert flag in text
    assert ("--provider" in text) == (main is onnx_main) and ("--format" in text) == (main is torchscript_main)


def test_cli_builds_from_the_adapter_file_and_verifies(cli):
    done, folder = cli["adapter_file"]
    assert done.returncode == 0, done.stderr
    assert _files(folder) == ["m.onnx", "m.onnx.json"]
    assert "PASSED" in done.stdout and "folded/base" in done.stdout and "max rel err" in done.stdout
    assert "[1/9] building vit_tiny_patch16_224" in done.stderr  # progress lines
    data = json.loads((folder / "m.onnx.json").read_text())
    assert data["passed"] and data["adapter"]["origin"] == "file" and data["model"]["name"] == "vit_tiny_patch16_224"
    assert data["adapter"]["config"]["rank"] == 2 and onnx_batch_dim(folder / "m.onnx")


def test_cli_torchscript(cli):
    done, folder = cli["torchscript"]
    assert done.returncode == 0, done.stderr
    assert _files(folder) == ["m.pt", "m.pt.json"] and "torch.jit.trace" in done.stdout


def test_cli_mismatch_exits_1_with_the_numbers(cli):
    done, folder = cli["mismatch"]
    assert done.returncode == 1, done.stderr
    assert "FAIL" in done.stdout and "max rel error" in done.stderr and "> tolerance 1.0e-04" in done.stderr
    assert _files(folder) == []  # --keep-on-fail: test_keep_on_fail_keeps_the_file_and_its_report


@pytest.mark.parametrize(
    ("case", "status", "needles"),
    [
        ("unknown_model", 2, ["unknown model 'vit_tiny_patch16_2244'", "Did you mean", "vit_tiny_patch16_224"]),
        ("foreign_adapter", 2, ["does not fit", "conv1"]),
        ("conflicting_model", 2, ["was made for 'vit_tiny_patch16_224'"]),
        ("bad_weights", 2, ["cannot read weight file", "junk.pth"]),
        ("missing_folder", 2, ["does not exist"]),
        ("unwritable_folder", 2, ["not writable"]),
        ("unsupported_op", 3, ["rlrr_test.twist", "no ONNX translation"]),
        ("existing_output", 2, ["already exist", "--force"]),
        ("output_is_input", 2, ["never overwritten"]),
        ("no_runtime", 4, ["onnxruntime is not installed", "rlrr[cpu]", "--no-verify"]),
    ],
)
def test_cli_bad_input_exits_non_zero_and_writes_nothing(cli, case, status, needles):
    done, folder = cli[case]
    assert done.returncode == status, (done.stdout, done.stderr)
    for needle in needles:
        assert needle in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert _files(folder) == []
    digest, d = cli["_vit_digest"]
    assert hashlib.sha256((d / "vit.safetensors").read_bytes()).hexdigest() == digest
    assert (d / "existing.onnx").read_bytes() == b"precious" and not any(p.name.endswith(".tmp") for p in d.iterdir())


def test_cli_no_verify_needs_no_runtime(cli):
    done, folder = cli["no_runtime_no_verify"]
    assert done.returncode == 0, done.stderr
    assert _files(folder) == ["m.onnx", "m.onnx.json"] and "not verified" in done.stdout
    assert json.loads((folder / "m.onnx.json").read_text())["verified"] is False


def test_an_adapter_file_from_the_zoo_rebuilds_its_preset(tmp_path):
    """A zoo checkpoint names its preset: torchvision's ResNet twin is rebuilt, not timm's namesake."""
    import warnings

    import zoo

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", zoo.RandomWeightsWarning)
        model = zoo.build("resnet18", num_classes=5, tiny=True)
    with torch.no_grad():  # a trained head: the zoo's fresh head would make outputs trivially equal
        for p in model.fc.parameters():
            p.normal_()
    path = rlrr.save_adapter(model, tmp_path / "a.safetensors", metadata=zoo.adapter_metadata(model))
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    report = export_onnx(None, out, adapter=path, **FAST)
    assert_verified(report, out)
    data = json.loads((out.parent / "m.onnx.json").read_text())
    assert "zoo preset resnet18" in json.dumps(data["model"])
