"""`python -m finetune` under careless and hostile input: every failure is one line, a documented
status, and nothing trained or written when the input is at fault.

One test per class of problem: exit statuses (0, 2, 3, 5, 70, 130; one subprocess for "no
traceback"), data sets checked before training, reproducible runs, options checked at the config,
and files that appear whole (stale temp files of killed runs removed, a full disk leaving the last
checkpoint intact). Data: a few 8x8 PNGs per class, made here; model: the tiny ViT twin (32 px).
"""

from __future__ import annotations

import errno
import json
import math
import os
import pathlib
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file

import rlrr
from finetune import BatchSizeError, CheckpointError, DataError, FinetuneConfig, Generated, RecipeError, ResourceError
from finetune import checkpoint as ckpt
from finetune import loop
from finetune.__main__ import EXIT_BUG, EXIT_DIVERGED, EXIT_ENVIRONMENT, EXIT_INPUT, EXIT_INTERRUPTED, EXIT_OK, main
from finetune.data import load_data

ROOT = Path(__file__).resolve().parents[1]
VIT = "vit_tiny_patch16_224"
FAST = ["--preset", VIT, "--tiny", "--epochs", "1", "--batch-size", "2", "--workers", "0", "--quiet"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def png(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    Image.fromarray(torch.randint(0, 256, (8, 8, 3), generator=g, dtype=torch.uint8).numpy()).save(path, format="PNG")
    return path


def tree(root: Path, classes=("cat", "dog"), per_class: int = 3, splits=("train", "val")) -> Path:
    """An ImageFolder tree of 8x8 PNGs."""
    for s, split in enumerate(splits):
        for c, name in enumerate(classes):
            for i in range(per_class):
                png(root / split / name / f"{i}.png", 100 * s + 10 * c + i)
    return root


def poison_png(path: Path) -> None:
    """Scramble the pixel data but keep every chunk's CRC: the header check passes, decoding fails."""
    b = bytearray(path.read_bytes())
    i = b.index(b"IDAT")
    n = struct.unpack(">I", b[i - 4:i])[0]
    bad = bytes(b[i + 4:i + 6]) + bytes(x ^ 0x5A for x in b[i + 6:i + 4 + n])
    b[i + 4:i + 4 + n] = bad
    b[i + 4 + n:i + 8 + n] = struct.pack(">I", zlib.crc32(b"IDAT" + bad))
    path.write_bytes(bytes(b))


def run(args: list[str], capsys) -> tuple[int, list[str]]:
    """main() in process: its status and the non-empty lines it wrote on stderr."""
    capsys.readouterr()
    try:
        status = main(args)
    except SystemExit as e:  # argparse
        status = e.code
    return status, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def assert_one_line(lines: list[str], *fragments: str) -> None:
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def written(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


# --- 1. exit statuses, one line, nothing written on bad input ----------------------------------------


def test_exit_statuses_are_one_line_and_bad_input_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RLRR_DEBUG", raising=False)
    good = tree(tmp_path / "good")
    data_files = written(good)
    (tmp_path / "a_file").write_text("x")
    out = tmp_path / "out"
    bad_input = {  # flags -> a fragment of the one line
        ("--data", str(tree(tmp_path / "one", classes=("only",)))): "has one class folder ('only')",
        ("--lr", "nan"): "learning rate must be a positive number, got nan",
        ("--epochs", "0"): "epochs must be an integer >= 1",
        ("--epochs", "1.5"): "argument --epochs: invalid int value: '1.5'",
        ("--preset", "vit_tiny"): "unknown preset 'vit_tiny'",
        ("--output", str(tmp_path / "a_file")): "is a file, not a folder",
        ("--output", str(tmp_path / "a_file" / "run")): "a_file is a file, not a folder",
        ("--output", str(good / "train")): "is inside the data folder",
        ("--data", "x\0y"): "data contains a NUL byte",
        ("--data", str(tmp_path / "\x1b[2Jred\nforged")): "\\x1b[2Jred forged does not exist",  # escaped, one line
    }
    for flags, fragment in bad_input.items():
        args = [*FAST, "--output", str(out), *flags] if "--output" not in flags else [*FAST, "--data", str(good), *flags]
        status, lines = run(args, capsys)
        assert status == EXIT_INPUT, (flags, lines)
        assert_one_line(lines, fragment)
        assert not out.exists() and written(good) == data_files, flags

    status, lines = run([*FAST, "--lr", "1e30", "--batch-size", "8", "--output", str(tmp_path / "nan")], capsys)
    assert status == EXIT_DIVERGED
    assert_one_line(lines, "training diverged: the loss is nan", "no epoch was written", "Lower --lr")
    assert written(tmp_path / "nan") == []

    def full(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", a and a[0])

    with monkeypatch.context() as m:
        m.setattr(tempfile, "mkstemp", lambda *a, **k: full(k.get("dir")))
        status, lines = run([*FAST, "--output", str(tmp_path / "locked" / "run")], capsys)
    assert status == EXIT_ENVIRONMENT
    assert_one_line(lines, "error (environment): output", "Permission denied (errno EACCES)")
    assert not (tmp_path / "locked").exists()

    with monkeypatch.context() as m:
        m.setattr(loop, "evaluate", lambda *a, **k: 1 / 0)
        status, lines = run([*FAST, "--output", str(tmp_path / "bug")], capsys)
        assert status == EXIT_BUG
        assert_one_line(lines, "internal error (a bug; rerun with --debug", "ZeroDivisionError")
        status, lines = run([*FAST, "--output", str(tmp_path / "bug2"), "--debug"], capsys)
        assert status == EXIT_BUG and lines[0].startswith("Traceback") and lines[-1].startswith("finetune: internal error")

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(loop, "train_epoch", interrupt)
        status, lines = run([*FAST, "--output", str(tmp_path / "cut")], capsys)
    assert status == EXIT_INTERRUPTED and lines == ["finetune: interrupted before the first epoch ended: no checkpoint was written"]

    status, lines = run([*FAST, "--data", str(good), "--output", str(out)], capsys)
    assert status == EXIT_OK and lines == [] and (out / "best.safetensors").is_file()


def test_the_cli_prints_no_traceback(tmp_path):
    data = tree(tmp_path / "d")
    (data / "train" / "cat" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n but no image")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("RLRR_DEBUG", None)
    done = subprocess.run([sys.executable, "-m", "finetune", *FAST, "--data", str(data), "--output", str(tmp_path / "out")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == EXIT_INPUT, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert_one_line(lines, "1 of 12 image files cannot be decoded", "train/cat/1.png", "--skip-bad-images")
    assert not (tmp_path / "out").exists()


# --- 2. data sets are checked before training --------------------------------------------------------


def test_data_sets_are_checked_before_training(tmp_path, capsys):
    one = tree(tmp_path / "one", classes=("only",))
    with pytest.raises(DataError, match=r"one/train has one class folder \('only'\): a classifier needs at least two"):
        load_data(one, img_size=32)
    lists = tmp_path / "lists"
    png(lists / "x.png", 1)
    (lists / "train.txt").write_text("x.png 0\nx.png 0\n")
    (lists / "val.txt").write_text("x.png 0\n")
    with pytest.raises(DataError, match=r"train.txt: every training image has label 0"):
        load_data(lists, img_size=32)
    (lists / "train.txt").write_text("x.png 0\ngone.png 1\n")
    with pytest.raises(DataError, match=r"1 of 2 listed images do not exist, e.g. \['.*gone.png'\]"):
        load_data(lists, img_size=32)
    (lists / "train.txt").write_text("x.png 0\nx.png ²\n")  # passes str.isdigit(), not int()
    with pytest.raises(DataError, match=r"train.txt:2: expected '<relative path> <integer label>'"):
        load_data(lists, img_size=32)
    (lists / "train.txt").write_text("x.png 0\nx.png 999999999\n")  # a head of a billion rows
    with pytest.raises(DataError, match=r"train.txt:2: label 999999999 is outside"):
        load_data(lists, img_size=32)
    fgvc = tmp_path / "fgvc"
    png(fgvc / "images" / "x.png", 2)
    (fgvc / "train.json").write_text("{}")
    with pytest.raises(DataError, match=r"train.json lists no images"):
        load_data(fgvc, img_size=32)
    hollow = tree(tmp_path / "hollow", splits=("train",))
    (hollow / "val").mkdir()
    with pytest.raises(DataError, match=r"hollow/val is empty: expected the class folders"):
        load_data(hollow, img_size=32)

    bad = tree(tmp_path / "bad", per_class=4)
    (bad / "train" / "cat" / "0.png").write_bytes(b"")  # empty file
    (bad / "val" / "dog" / "1.png").write_bytes(b"GIF89a garbage")  # another format's header, then nothing
    with pytest.raises(DataError, match=r"2 of 16 image files cannot be decoded: .*train/cat/0.png .*val/dog/1.png"):
        load_data(bad, img_size=32)
    with pytest.warns(UserWarning, match=r"left out 2 of 16 image files"):
        data = load_data(bad, img_size=32, skip_bad_images=True)
    assert len(data.train) == 7 and len(data.val) == 7 and len(data.skipped) == 2
    verbose = [f for f in FAST if f != "--quiet"]
    status, lines = run([*verbose, "--batch-size", "7", "--data", str(bad), "--skip-bad-images", "--output", str(tmp_path / "skip"),
                         "--progress", "lines"], capsys)
    assert status == EXIT_OK and any("warning: " in line and "left out 2 of 16 image files" in line for line in lines)
    skipped = json.loads((tmp_path / "skip" / "metrics.json").read_text())["run"]["skipped_images"]
    assert [Path(s["file"]).name for s in skipped] == ["0.png", "1.png"]

    late = tree(tmp_path / "late")
    poison_png(late / "train" / "dog" / "2.png")  # valid chunks: only decoding finds it, in a worker process
    status, lines = run([*FAST, "--data", str(late), "--workers", "1", "--output", str(tmp_path / "late_out")], capsys)
    assert status == EXIT_INPUT
    assert_one_line(lines, "late/train/dog/2.png cannot be decoded", "no epoch was written")
    assert written(tmp_path / "late_out") == []


# --- 3. seeds make runs reproducible ------------------------------------------------------------------


def test_same_flags_same_files_give_identical_runs(tmp_path, capsys):
    data = tree(tmp_path / "d", classes=("a", "b", "c"), per_class=2)
    flags = {"generated": [], "imagefolder": ["--data", str(data), "--workers", "1", "--mixup", "--drop-path", "0.1",
                                              "--crop", "random-resized"]}
    for name, extra in flags.items():
        outs = [tmp_path / f"{name}{k}" for k in range(2)]
        for out in outs:
            assert run([*FAST, "--batch-size", "6", *extra, "--output", str(out)], capsys)[0] == EXIT_OK
        a, b = (load_file(o / "last.safetensors") for o in outs)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        ma, mb = ([{k: v for k, v in row.items() if k not in ("images_per_s", "seconds")}
                   for row in json.loads((o / "metrics.json").read_text())["epochs"]] for o in outs)
        assert ma == mb and math.isfinite(ma[0]["train_loss"]), name


# --- 4. options are checked at the config ---------------------------------------------------------------


@pytest.mark.parametrize("field, value, error, message", [
    ("lr", float("inf"), RecipeError, "learning rate must be a positive number"),
    ("lr", "0.1", RecipeError, "lr must be a number"),
    ("weight_decay", -1e-4, RecipeError, "weight_decay must be a finite number >= 0"),
    ("epochs", True, RecipeError, "epochs must be an integer >= 1"),
    ("epochs", 2.0, RecipeError, "epochs must be an integer >= 1"),
    ("batch_size", -32, BatchSizeError, "batch size must be an integer >= 1"),
    ("accum", 0, BatchSizeError, "accum must be an integer >= 1"),
    ("rank", 0, RecipeError, "rank must be an integer >= 1"),
    ("img_size", 100_000, RecipeError, "img_size must be an integer from 1 to 1024"),
    ("workers", -1, RecipeError, "workers must be an integer from 0 to 64"),
    ("seed", 2**70, RecipeError, "seed must be an integer from 0 to 4294967295"),
    ("label_smoothing", 1.0, RecipeError, "label_smoothing must be below 1"),
    ("min_lr", 1.0, RecipeError, "min_lr 1 is above the learning rate"),
    ("warmup_epochs", 3.0, RecipeError, r"warm-up \(3.0 epochs\) must end before the cosine decay"),
    ("device", "cuda:x", RecipeError, "device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ("output", "", RecipeError, "output must be a non-empty string"),
    ("weights", "w\0.pth", RecipeError, "weights contains a NUL byte"),
    ("skip_bad_images", "yes", RecipeError, "skip_bad_images must be True or False"),
    ("generated", Generated(classes=1), RecipeError, "generated.classes must be an integer >= 2"),
    ("generated", Generated(train=10**6), RecipeError, "at most 4096 images"),
    ("preset", "nope", rlrr.RLRRError, "unknown preset 'nope'"),
])
def test_options_are_checked_at_the_config(field, value, error, message, tmp_path):
    config = FinetuneConfig(**{"preset": VIT, "tiny": True, "epochs": 3, "output": str(tmp_path / "out"), "progress": "none",
                               field: value})
    with pytest.raises(error, match=message):
        loop.finetune(config)
    assert not (tmp_path / "out").exists()


def test_resume_does_not_overwrite_another_run(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run([*FAST, "--output", str(a)], capsys)[0] == EXIT_OK
    assert run([*FAST, "--output", str(b), "--seed", "7"], capsys)[0] == EXIT_OK
    before = (b / "last.safetensors").read_bytes()
    status, lines = run(["--resume", str(a), "--output", str(b)], capsys)
    assert status == EXIT_INPUT
    assert_one_line(lines, f"output {b} holds another run (seed: checkpoint 7, now 42)", "--force")
    assert (b / "last.safetensors").read_bytes() == before
    with pytest.raises(CheckpointError, match="cannot be read .*UnpicklingError"):
        ckpt.load_state(png(tmp_path / "x.pt", 0))  # not a checkpoint: one line, not torch's advice page


# --- 5. files appear whole ------------------------------------------------------------------------------


def test_stale_temp_files_of_killed_runs_are_removed_and_live_ones_kept(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [out / f".last.safetensors.{dead.pid}.tmp", out / "checkpoints" / f".epoch-0001.pt.{dead.pid}.tmp"]
        kept = [out / f".best.safetensors.{live.pid}.tmp", out / f".notes.txt.{dead.pid}.tmp"]  # a live writer; not our file
        for p in stale + kept:
            p.write_bytes(b"half a file")
        result = loop.finetune(FinetuneConfig(preset=VIT, tiny=True, epochs=1, batch_size=8, output=str(out), progress="none"))
        assert result.files["best"].is_file()
        assert all(not p.exists() for p in stale) and all(p.exists() for p in kept)
    finally:
        live.kill()
        live.wait()


def test_a_full_disk_leaves_the_last_checkpoint_intact_and_no_temp_file(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real_write = pathlib.Path.write_bytes
    calls = []

    def fill_up(self, data):  # the second state file: half written, then the disk is full
        calls.append(self.name)
        if len(calls) == 2:
            real_write(self, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    with monkeypatch.context() as m:
        m.setattr(pathlib.Path, "write_bytes", fill_up)
        status, lines = run([*FAST, "--epochs", "2", "--batch-size", "8", "--output", str(out)], capsys)
    assert status == EXIT_ENVIRONMENT
    assert_one_line(lines, "epoch-0002.pt: No space left on device (errno ENOSPC)", f"--resume --output {out}")
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert [e for e, _ in ckpt.list_states(out)] == [1] and ckpt.load_state(ckpt.state_path(out, 1))["epoch"] == 1
    rlrr.read_adapter_file(out / "last.safetensors")
    assert run(["--resume", "--output", str(out), "--quiet"], capsys)[0] == EXIT_OK
    assert [e for e, _ in ckpt.list_states(out)] == [1, 2]

    with pytest.raises(ResourceError, match="cannot write X: No space left on device") as e, ckpt.storage("cannot write X"):
        # how safetensors' Rust writer reports a full disk: its own error type, the OS error in the text
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert e.value.errno == errno.ENOSPC
