"""Several tasks of one base model in one ONNX file: routed per row, or one task per run.

One routed file (through `python -m export.onnx`, in process) and one adapter-inputs file are
exported from three random adapter files of the ViT twin with 5, 7 and 3 classes and shared by
the tests that read them. Checked: each task's rows match its unmerged model, padding is -inf,
the base weights are stored once, onnxruntime refuses task indices outside 0..K-1 (negative
ones included) and a task list of the wrong length, the README's serving loop runs each task
through its `.onnx_adapter` and agrees with the routed file, and files that do not belong
together are refused before anything is exported (exit 2).
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from safetensors.torch import save_file

import rlrr
import zoo
from export.multitask import export_multitask
from export.onnx import OnnxExporter
from export.onnx import main as onnx_main
from export.pipeline import resolve_spec

PRESET = "vit_base_patch16_224"  # its test-size twin: 2 blocks, 32 px
CLASSES = (5, 7, 3)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def adapter_file(path: Path, classes: int, seed: int, preset: str = PRESET, **build) -> Path:
    """A random adapter file (every adapter tensor and the head non-zero) with zoo metadata."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        model = zoo.build(preset, num_classes=classes, tiny=True, **build)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_((1.0 if name.endswith("rlrr_scale") else 0.0) + torch.randn(p.shape, generator=g) * (0.1 if "rlrr_" in name else 0.05))
    rlrr.save_adapter(model, path, metadata={**zoo.adapter_metadata(model), "task": f"task{seed}"})
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("adapters")
    out = {f"a{i}": adapter_file(d / f"a{i}.safetensors", c, i) for i, c in enumerate(CLASSES)}
    out["swin"] = adapter_file(d / "swin.safetensors", 5, 7, "swin_base_patch4_window7_224")
    out["rank2"] = adapter_file(d / "rank2.safetensors", 5, 8, rank=2)
    out["img48"] = adapter_file(d / "img48.safetensors", 5, 9, img_size=48)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(3)
        base = zoo.build_base(PRESET, CLASSES[0], tiny=True)
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0, 0.2)  # no zero-initialised head or gammas hiding an error
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(d / "base.safetensors"))
    out["base"] = d / "base.safetensors"  # both exports get the same base weights
    return out


@pytest.fixture(scope="module")
def routed(files, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("routed") / "multi.onnx"
    status = onnx_main(["--weights", str(files["base"]), "--adapter", str(files["a0"]), "--adapter", f"cars={files['a1']}",
                        "--adapter", str(files["a2"]), "--out", str(out), "--batch-sizes", "2,5", "--inputs", "2", "--latency-runs", "0", "-q"])
    assert status == 0
    return out, json.loads(out.with_name("multi.onnx.json").read_text())


@pytest.fixture(scope="module")
def per_run(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("per_run") / "multi.onnx"
    spec = resolve_spec(adapter=files["a0"], weights=files["base"])
    report = export_multitask([str(files["a0"]), f"cars={files['a1']}", str(files["a2"])], out, OnnxExporter(), spec=spec, adapter_inputs=True,
                           batch_sizes=(2, 5), inputs_per_batch=2, latency_runs=0)
    return out, report


# --- routed: one file, a task per row ------------------------------------------------------


def test_routed_file_checks_every_task_on_its_own_rows(routed):
    out, report = routed
    assert report["passed"] is True and report["mode"] == "routed"
    assert [(t["name"], t["index"], t["classes"]) for t in report["tasks"]] == [("task0", 0, 5), ("cars", 1, 7), ("task2", 2, 3)]
    assert all(t["rows"] > 0 and t["padding_ok"] and t["max_rel"] <= 1e-4 for t in report["tasks"])
    assert sum(t["rows"] for t in report["tasks"]) == 2 * (2 + 5)
    assert sorted(p.name for p in out.parent.iterdir()) == ["multi.onnx", "multi.onnx.json"]
    model = onnx.load(str(out))
    shapes = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert shapes == {"input": ["batch", 3, 32, 32], "task": ["batch"]}
    assert [o.name for o in model.graph.output] == ["output"]
    tasks = json.loads({p.key: p.value for p in model.metadata_props}["rlrr.tasks"])
    assert [(t["name"], t["classes"]) for t in tasks] == [("task0", 5), ("cars", 7), ("task2", 3)]


def test_routed_file_holds_the_base_weights_once(routed):
    out, report = routed
    stored = sum(numpy_helper.to_array(t).nbytes for t in onnx.load(str(out)).graph.initializer)
    sizes = report["sizes"]
    constants = 2048  # shapes and scalars the exporter stores as initializers, the task ids, the heads' offsets
    weights = sizes["base"] + sizes["adapters"] + sizes["heads"]
    assert weights <= stored <= weights + constants  # a second copy of any weight would be 16 KB or more; heads are not padded


def test_routed_output_pads_with_minus_inf_and_refuses_bad_task_indices(routed):
    out, _ = routed
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    y = session.run(None, {"input": x, "task": np.array([2, 1, 0])})[0]
    assert y.shape == (3, 7) and np.isneginf(y[0, 3:]).all() and np.isfinite(y[1]).all() and np.isneginf(y[2, 5:]).all()
    for bad in ([0, 3, 1], [0, -1, 1], [-4, 0, 0]):
        with pytest.raises(Exception, match="task_index_check.*out of data bounds"):
            session.run(None, {"input": x, "task": np.array(bad)})
    for wrong in ([0], [0, 1, 2, 0]):
        with pytest.raises(Exception):
            session.run(None, {"input": x, "task": np.array(wrong)})


# --- adapter inputs: a base file, one .onnx_adapter per task ---------------------------------


def test_adapter_inputs_file_checks_every_task_and_its_defaults(per_run):
    out, report = per_run
    assert report.passed is True and report.mode == "adapter inputs"
    assert [c.onnx_adapter for c in report.tasks] == [str(out.with_name(f"multi.{n}.onnx_adapter")) for n in ("task0", "cars", "task2")]
    assert report.defaults is not None and report.defaults.passed(report.tolerance)
    model = onnx.load(str(out))
    inputs = {i.name for i in model.graph.input}
    defaults = {t.name for t in model.graph.initializer}
    adapter_inputs = {n for n in inputs if n.startswith(("adapter.", "trained."))}
    assert "task" not in inputs and adapter_inputs and adapter_inputs <= defaults  # every adapter input has a default
    assert {"trained.head.weight", "trained.head.bias"} <= adapter_inputs
    stored = {k for k in ort.AdapterFormat.read_adapter(str(out.with_name("multi.cars.onnx_adapter"))).get_parameters()}
    assert stored == adapter_inputs


def test_the_readme_serving_loop_agrees_with_the_routed_file(per_run, routed):
    out, _ = per_run
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    # the README's serving loop, as written there
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    tasks = {}
    for name in ("task0", "cars", "task2"):
        adapter = ort.LoraAdapter()
        adapter.Load(str(out.with_name(f"multi.{name}.onnx_adapter")))
        options = ort.RunOptions()
        options.add_active_adapter(adapter)
        tasks[name] = (adapter, options)
    logits = {name: session.run(None, {"input": x}, options)[0] for name, (_, options) in tasks.items()}
    routed_session = ort.InferenceSession(str(routed[0]), providers=["CPUExecutionProvider"])
    for index, (name, classes) in enumerate(zip(tasks, CLASSES)):
        assert logits[name].shape == (2, classes)
        both = routed_session.run(None, {"input": x, "task": np.array([index, index])})[0]
        np.testing.assert_allclose(logits[name], both[:, :classes], rtol=1e-4, atol=1e-5)


# --- refused before anything is exported ------------------------------------------------------


@pytest.mark.parametrize(("extra", "said"), [
    ("swin", "different base models: .*swin.safetensors has model 'swin_base_patch4_window7_224', .*a0.safetensors has 'vit_base"),
    ("rank2", "rank2.safetensors and .*a0.safetensors use different RLRR options: rank 2 vs 1"),
    ("img48", "different base models: .*img48.safetensors has img_size 48"),
])
def test_files_that_do_not_belong_together_are_refused(files, tmp_path, capsys, extra, said):
    out = tmp_path / "multi.onnx"
    status = onnx_main(["--adapter", str(files["a0"]), "--adapter", str(files[extra]), "--out", str(out), "-q"])
    assert status == 2 and not out.exists() and list(tmp_path.iterdir()) == []
    assert re.search(said, capsys.readouterr().err)


def test_task_names_are_checked(files, tmp_path, capsys):
    out = tmp_path / "multi.onnx"
    assert onnx_main(["--adapter", str(files["a0"]), "--adapter", str(files["a0"]), "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert "two tasks are named 'task0'" in err and "name them, e.g. --adapter task0_a=" in err
    assert onnx_main(["--adapter", f"pets={files['a0']}", "--adapter", f"PETS={files['a1']}", "--out", str(out), "-q"]) == 2
    assert "two tasks are named 'PETS'" in capsys.readouterr().err
    assert onnx_main(["--adapter", str(files["a0"]), "--adapter", str(files["a1"]), "--dtype", "fp16", "--out", str(out), "-q"]) == 2
    assert "fp32 only" in capsys.readouterr().err
    assert not out.exists()


def test_torchscript_takes_one_adapter(files, tmp_path, capsys):
    from export.torchscript import main as torchscript_main

    assert torchscript_main(["--adapter", str(files["a0"]), "--adapter", str(files["a1"]), "--out", str(tmp_path / "m.pt"), "-q"]) == 2
    assert "exports one adapter; one file for several tasks is python -m export.onnx" in capsys.readouterr().err
