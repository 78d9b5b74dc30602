"""`finetune`: the paper's recipe as a loop, on generated data with the smallest ViT and ResNet twins.

- Training: the loss goes down; only adapter and head parameters change (the frozen base, BatchNorm
  statistics included, stays bit-identical); parameter groups follow the official `get_parameters`.
- Resume: a run interrupted mid-epoch (mixup and drop path on, so every RNG matters) and resumed
  from its last complete checkpoint ends bit-identical to the uninterrupted run.
- DDP: two gloo processes (torchrun) give the single-process result with the same global batch,
  up to floating-point tolerance.
- Files: the best checkpoint exports through `export.onnx` with no other flag and rebuilds with
  `zoo.from_adapter`; metrics files hold one row per epoch.
- Bad input fails before training with a message that says what is wrong: data folders, splits,
  batch sizes, output folders, corrupted or foreign checkpoints.
Models are tiny twins with 32 px (ResNet 16 px) inputs and a few updates per epoch, one thread.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import rlrr
import zoo
from finetune import (
    BatchSizeError,
    CheckpointError,
    DataError,
    FinetuneConfig,
    Generated,
    RecipeError,
    ResumeMismatchError,
    finetune,
)
from finetune import checkpoint as ckpt
from finetune.__main__ import main
from finetune.data import Augmented, load_data, transforms
from finetune.loop import seed_everything
from finetune.model import build_for_training
from finetune.recipe import make_optimizer, make_scheduler, parameter_groups

ROOT = Path(__file__).resolve().parents[1]
VIT, RESNET = "vit_tiny_patch16_224", "resnet18"
GEN = Generated(classes=3, train=8, val=4, test=4)  # 24 train images: 4 updates of 6 per epoch
DDP_TOL = 1e-5  # logits and per-epoch losses of 1 vs 2 processes
TENSOR_TOL = 1e-3  # adapter tensors: see test_two_gloo_processes_match_one_process


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def vit_config(output: Path, **kw) -> FinetuneConfig:
    return FinetuneConfig(**{"preset": VIT, "tiny": True, "generated": GEN, "epochs": 3, "batch_size": 6, "lr": 1e-2,
                             "output": str(output), "progress": "none", **kw})


def frozen_and_trained(model: torch.nn.Module) -> tuple[dict, set]:
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.clone() for k, v in model.state_dict().items()}, trained


def reference(config: FinetuneConfig, num_classes: int) -> torch.nn.Module:
    """The run's model before training: the same seed, the same build."""
    seed_everything(config.seed)
    return build_for_training(config.preset, num_classes, weights=None, rank=config.rank, init=config.init,
                              targets=config.targets, img_size=config.img_size, tiny=config.tiny, drop_path=0.0).model


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("vit") / "run"
    config = vit_config(out)
    return config, finetune(config)


# --- training ---------------------------------------------------------------------------------------


def assert_only_trainable_changed(before: dict, trained: set, model: torch.nn.Module) -> None:
    after = model.state_dict()
    assert set(after) == set(before)
    frozen_changed = [k for k in before if k not in trained and not torch.equal(before[k], after[k])]
    assert not frozen_changed, f"frozen tensors changed: {frozen_changed[:5]}"
    moved = [k for k in trained if not torch.equal(before[k], after[k])]
    assert len(moved) >= 0.9 * len(trained), f"only {len(moved)} of {len(trained)} trainable tensors moved"
    adapter = {n for n in trained if ".parametrizations." in n and n.rsplit(".", 1)[-1].startswith("rlrr_")}
    head = trained - adapter
    assert head and all(n.startswith(("head.", "fc.")) for n in head), head


def test_vit_loss_goes_down_and_only_adapters_and_head_change(vit_run):
    config, result = vit_run
    losses = [row["train_loss"] for row in result.history]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    assert result.history[-1]["val_loss"] < result.history[0]["val_loss"]
    before, trained = frozen_and_trained(reference(config, 3))
    assert trained == {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert_only_trainable_changed(before, trained, result.model)


def test_resnet_loss_goes_down_and_batchnorm_statistics_stay(tmp_path):
    config = FinetuneConfig(preset=RESNET, tiny=True, img_size=16, generated=Generated(3, 4, 2, 2), epochs=3, batch_size=6,
                            lr=1e-2, output=str(tmp_path / "rn"), progress="none")
    result = finetune(config)
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < losses[0], losses
    before, trained = frozen_and_trained(reference(config, 3))
    assert any(k.endswith("running_mean") for k in before)  # BatchNorm statistics are compared too
    assert_only_trainable_changed(before, trained, result.model)


def test_parameter_groups_follow_the_official_code():
    model = zoo.build(VIT, num_classes=3, tiny=True)
    decay, no_decay = (set(g["names"]) for g in parameter_groups(model, 0.05))
    patch_scale = "patch_embed.proj.parametrizations.weight.0.rlrr_scale"  # official ssf_scale_patch: decays
    assert decay == {n for n in decay | no_decay if n.endswith(("rlrr_s_left", "rlrr_s_right"))} | {"head.weight", patch_scale}
    assert "blocks.0.norm1.parametrizations.weight.0.rlrr_scale" in no_decay  # official ssf_scale_attn_norm: 'norm'
    assert all(n.endswith("rlrr_shift") or n == "head.bias" or n.endswith("rlrr_scale") for n in no_decay)
    optimizer = make_optimizer(model, 1e-3, 0.05)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == sum(p.requires_grad for p in model.parameters())


def test_schedule_warms_up_then_decays_to_min_lr():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = make_scheduler(opt, epochs=10, updates_per_epoch=10, warmup_epochs=1, cooldown_epochs=2, min_lr=1e-8, warmup_lr=1e-7)
    lrs = []
    for step in range(100):
        sched.step_update(step)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(1e-7) and lrs[5] < lrs[9] < 1e-2  # linear warm-up over 10 updates
    # timm's (and the official code's) warm-up overlays the cosine's first epoch, so the peak is its value at t = 10 of 80
    assert max(lrs) == pytest.approx(1e-8 + 0.5 * (1e-2 - 1e-8) * (1 + math.cos(math.pi * 10 / 80))) and lrs[50] < lrs[20]
    assert lrs[80:] == [pytest.approx(1e-8)] * 20  # cooldown at min lr


def test_augmentation_is_seeded_per_sample_and_leaves_global_rng_alone():
    data = load_data(None, img_size=32, generated=GEN)
    train_tf, _ = transforms("random-resized", 32, flip=True, mean=(0.5,) * 3, std=(0.5,) * 3)
    ds = Augmented(data.train, train_tf, seed=1)
    state = torch.get_rng_state()
    first = ds[5][0]
    _ = [ds[i] for i in range(4)]
    assert torch.equal(ds[5][0], first)  # the same image whatever came before (other workers, processes)
    assert torch.equal(torch.get_rng_state(), state)
    ds.set_epoch(1)
    assert not torch.equal(ds[5][0], first)  # a new crop next epoch


# --- resume -------------------------------------------------------------------------------------------


class Interrupt(KeyboardInterrupt):
    pass


def untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in ("images_per_s", "seconds")} for row in rows]


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    options = dict(mixup=True, drop_path=0.1, accum=2, batch_size=8)  # RNG-dependent training; 3 updates of 2 x 4 per epoch
    full = finetune(vit_config(tmp_path / "full", **options))

    def stop_mid_epoch_2(event, info):
        if event == "update" and info["epoch"] == 2 and info["step"] == 5:
            raise Interrupt

    cut = tmp_path / "cut"
    with pytest.raises(Interrupt):
        finetune(vit_config(cut, **options), hook=stop_mid_epoch_2)
    assert [e for e, _ in ckpt.list_states(cut)] == [1]  # epoch 2 never completed: epoch 1 is the last checkpoint
    rlrr.read_adapter_file(cut / "last.safetensors")  # intact
    resumed = finetune(vit_config(cut, resume="auto", **options))
    a, b = load_file(tmp_path / "full" / "last.safetensors"), load_file(cut / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert untimed(resumed.history) == untimed(full.history)
    assert untimed(json.loads((cut / "metrics.json").read_text())["epochs"]) == untimed(full.history)
    assert resumed.test == full.test


def test_resume_from_a_corrupted_checkpoint_names_the_good_one(vit_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(vit_run[0].output, run)
    newest = ckpt.state_path(run, 3)
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, as by a full disk
    with pytest.raises(CheckpointError) as e:
        finetune(vit_config(run, resume="auto"))
    assert "epoch-0003.pt" in str(e.value) and "cannot be read" in str(e.value)
    assert f"--resume {ckpt.state_path(run, 2)}" in str(e.value)
    assert ckpt.load_state(ckpt.state_path(run, 2))["epoch"] == 2  # the older one is kept, intact
    resumed = finetune(vit_config(run, resume=str(ckpt.state_path(run, 2))))
    assert len(resumed.history) == 3


def test_resume_refuses_a_checkpoint_of_another_run(vit_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(vit_run[0].output, run)
    stamp = (run / "last.safetensors").stat().st_mtime_ns
    with pytest.raises(ResumeMismatchError, match="preset: checkpoint 'vit_tiny_patch16_224', now 'resnet18'"):
        finetune(vit_config(run, resume="auto", preset=RESNET))
    with pytest.raises(ResumeMismatchError, match="batch_size: checkpoint 6, now 12"):
        finetune(vit_config(run, resume="auto", batch_size=12))
    assert (run / "last.safetensors").stat().st_mtime_ns == stamp


# --- DDP ------------------------------------------------------------------------------------------------


def test_two_gloo_processes_match_one_process(tmp_path):
    """Same global batch (8 = 2 x 4), same data order and augmentation: the same training.

    Per-epoch losses and the trained models' logits agree to 1e-5. The adapter tensors agree to
    about 1e-7 except the key part of each qkv shift: a key bias cannot change softmax attention,
    so its true gradient is zero and Adam turns the rounding noise of that zero into steps of up
    to lr; those entries differ by about 1e-4 and change no output.
    """
    args = ["--preset", VIT, "--tiny", "--epochs", "2", "--batch-size", "8", "--lr", "3e-3", "--progress", "lines"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "finetune",
                           *args, "--output", str(tmp_path / "ddp")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes (gloo); DDP all-reduces 2,244 values in 38 tensors (adapters and head only)" in done.stderr
    config = FinetuneConfig(preset=VIT, tiny=True, epochs=2, batch_size=8, lr=3e-3, output=str(tmp_path / "one"), progress="none")
    one = finetune(config)
    ddp_rows = json.loads((tmp_path / "ddp" / "metrics.json").read_text())["epochs"]
    for a, b in zip(one.history, ddp_rows, strict=True):
        assert abs(a["train_loss"] - b["train_loss"]) < DDP_TOL and abs(a["val_loss"] - b["val_loss"]) < DDP_TOL
    a, b = load_file(tmp_path / "one" / "last.safetensors"), load_file(tmp_path / "ddp" / "last.safetensors")
    diff = {k: (a[k] - b[k]).abs().max().item() for k in a}
    print(f"\nDDP equivalence: max abs diff of adapter/head tensors {max(diff.values()):.2e} "
          f"({max(diff, key=diff.get)}), without qkv shifts {max(v for k, v in diff.items() if 'qkv.rlrr_shift' not in k):.2e}")
    assert max(diff.values()) < TENSOR_TOL
    assert max(v for k, v in diff.items() if "qkv.rlrr_shift" not in k) < DDP_TOL
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    logits = []
    for path in (tmp_path / "one" / "last.safetensors", tmp_path / "ddp" / "last.safetensors"):
        model = rlrr.load_adapter(reference(config, 4), path).eval()
        with torch.no_grad():
            logits.append(model(x))
    torch.testing.assert_close(logits[0], logits[1], atol=DDP_TOL, rtol=0)


# --- files -----------------------------------------------------------------------------------------------


def test_output_files_and_metadata(vit_run):
    config, result = vit_run
    out = Path(config.output)
    assert sorted(p.name for p in out.iterdir()) == ["best.safetensors", "checkpoints", "last.safetensors", "metrics.csv", "metrics.json"]
    assert [e for e, _ in ckpt.list_states(out)] == [2, 3]  # the newest and the one before
    lines = (out / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("epoch,step,lr,train_loss,train_acc") and len(lines) == 4
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["best"]["epoch"] == result.best_epoch and metrics["test"]["images"] == 12
    meta = rlrr.read_adapter_file(out / "best.safetensors").metadata
    assert {k: meta[k] for k in ("preset", "model", "num_classes", "img_size", "tiny")} == {
        "preset": VIT, "model": VIT, "num_classes": 3, "img_size": 32, "tiny": True}
    assert meta["classes"] == ["class0", "class1", "class2"] and meta["placement"]["fused_chunks"] is True
    assert meta["finetune"]["epoch"] == result.best_epoch
    rebuilt = zoo.from_adapter(out / "last.safetensors")
    trained = dict(result.model.named_parameters())
    for name, p in rebuilt.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, trained[name]), name


def test_best_checkpoint_exports_through_export_onnx(vit_run, tmp_path):
    export_onnx = pytest.importorskip("export.onnx", reason="export.onnx is not available").export_onnx
    pytest.importorskip("onnxruntime")
    best = Path(vit_run[0].output) / "best.safetensors"
    report = export_onnx(None, tmp_path / "model.onnx", adapter=best, batch_sizes=(1, 2), inputs_per_batch=1, latency_runs=0)
    assert report.passed and (tmp_path / "model.onnx").is_file()
    assert report.adapter["origin"] == "file" and report.input_shape == [3, 32, 32]


# --- data layouts ------------------------------------------------------------------------------------------


def write_png(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (value, 64, 128)).save(path)


def folder_tree(root: Path, splits: dict[str, list[str]], per_class: int = 2) -> Path:
    for split, classes in splits.items():
        for c in classes:
            for i in range(per_class):
                write_png(root / split / c / f"{i}.png", i)
    return root


def test_imagefolder_tree(tmp_path):
    root = folder_tree(tmp_path / "d", {"train": ["cat", "dog"], "val": ["cat", "dog"], "test": ["cat", "dog"]})
    data = load_data(root, img_size=32)
    assert data.form == "imagefolder" and data.classes == ["cat", "dog"] and len(data.train) == 4 and len(data.test) == 4
    final = load_data(root, img_size=32, protocol="final")
    assert len(final.train) == 8 and len(final.val) == 4 and final.test is None


def test_vtab_lists_and_a_cli_run(tmp_path, capsys):
    root = tmp_path / "vtab"
    lines = {}
    for split, n in (("train800", 8), ("val200", 4), ("test", 4)):
        lines[split] = [f"images/{split}/{i}.png {i % 2}" for i in range(n)]
        for i in range(n):
            write_png(root / "images" / split / f"{i}.png", 40 * (i % 2))
        (root / f"{split}.txt").write_text("\n".join(lines[split]) + "\n")
    (root / "train800val200.txt").write_text("\n".join(lines["train800"] + lines["val200"]) + "\n")
    data = load_data(root, img_size=32, protocol="final")
    assert data.form == "list" and data.classes == ["0", "1"] and len(data.train) == 12 and len(data.val) == 4
    assert data.split_names == {"train": "train800val200.txt", "val": "test.txt"}
    out = tmp_path / "out"
    assert main(["--preset", VIT, "--tiny", "--data", str(root), "--epochs", "1", "--batch-size", "4", "--output", str(out), "--quiet"]) == 0
    assert rlrr.read_adapter_file(out / "best.safetensors").metadata["finetune"]["val_split"] == "val200.txt"
    assert main(["--resume", "--output", str(out), "--quiet"]) == 0  # the options come from the checkpoint
    assert main(["--resume", "--output", str(out), "--quiet", "--preset", RESNET]) == 2
    assert "preset: checkpoint 'vit_tiny_patch16_224', now 'resnet18'" in capsys.readouterr().err


def test_fgvc_json_maps_label_ids_and_finds_the_images_folder(tmp_path):
    root = tmp_path / "cub"
    anno = {"train": {"a/1.png": 7, "b/2.png": 3}, "val": {"a/3.png": 7}, "test": {"b/4.png": 3}}
    for split, items in anno.items():
        for rel in items:
            write_png(root / "images" / rel)
        (root / f"{split}.json").write_text(json.dumps(items))
    data = load_data(root, img_size=32)
    assert data.form == "json" and data.default_crop == "random-resized" and data.classes == ["3", "7"]
    assert data.train[0][1] == 1 and data.train[1][1] == 0  # VPT: sorted ids -> 0..C-1


# --- bad input: clear errors before training ----------------------------------------------------------------


def expect(error, match: str, output: Path, **kw) -> None:
    with pytest.raises(error, match=match):
        finetune(vit_config(output, **kw))
    assert not output.exists() or not any(output.iterdir()), "nothing may be written before the checks pass"


def test_data_errors(tmp_path):
    out = tmp_path / "out"
    expect(DataError, "does not exist", out, data=str(tmp_path / "nope"))
    (tmp_path / "empty" / "train").mkdir(parents=True)
    expect(DataError, r"empty/train is empty", out, data=str(tmp_path / "empty"))
    (tmp_path / "nothing").mkdir()
    expect(DataError, "holds no dataset: expected train/ and val/", out, data=str(tmp_path / "nothing"))
    folder_tree(tmp_path / "mismatch", {"train": ["a", "b"], "val": ["a", "c"]})
    expect(DataError, r"class mismatch between splits: .*val lacks \['b'\] and has \['c'\]", out, data=str(tmp_path / "mismatch"))
    folder_tree(tmp_path / "hollow", {"train": ["a", "b"], "val": ["a", "b"]})
    for f in (tmp_path / "hollow" / "val" / "b").iterdir():
        f.unlink()
    expect(DataError, r"hollow/val/b has no images", out, data=str(tmp_path / "hollow"))
    lists = tmp_path / "lists"
    write_png(lists / "x.png")
    (lists / "train800.txt").write_text("x.png 0\nx.png 1\n")
    (lists / "val200.txt").write_text("x.png 5\n")
    expect(DataError, r"class mismatch between splits: val has labels \[5\]", out, data=str(lists))
    (lists / "val200.txt").write_text("missing.png 0\n")
    expect(DataError, r"1 of 1 listed images do not exist", out, data=str(lists))
    (lists / "val200.txt").write_text("x.png zero\n")
    expect(DataError, r"val200.txt:1: expected '<relative path> <integer label>'", out, data=str(lists))
    (lists / "val200.txt").write_text("x.png 0\n")
    expect(DataError, "protocol 'final' evaluates on the test split, and there is none", out, data=str(lists), protocol="final")
    expect(RecipeError, "dataset preset cifar100 is for 100 classes", out, dataset="cifar100")


def test_batch_size_and_option_errors(tmp_path):
    out = tmp_path / "out"
    expect(BatchSizeError, r"batch size 6 cannot be split over 1 process\(es\) x 4 accumulation step\(s\): it must be a multiple of 4", out, accum=4)
    expect(BatchSizeError, "batch size 48 is larger than the 24 training images", out, batch_size=48)
    expect(BatchSizeError, "batch size must be an integer >= 1", out, batch_size=0)
    expect(RecipeError, "fp16 mixed precision needs CUDA", out, amp="fp16", device="cpu")
    expect(RecipeError, "unknown dataset preset 'cifar10'", out, dataset="cifar10")
    expect(RecipeError, "learning rate must be a positive number", out, lr=-1.0)
    expect(zoo.UnknownPresetError, "unknown preset 'vit_tiny'", out, preset="vit_tiny")


def test_an_output_folder_with_a_run_is_not_overwritten(vit_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(vit_run[0].output, run)
    with pytest.raises(CheckpointError, match="already holds a run .*--resume.*--force"):
        finetune(vit_config(run))
    with pytest.raises(CheckpointError, match="nothing to resume from"):
        finetune(vit_config(tmp_path / "fresh", resume="auto"))
