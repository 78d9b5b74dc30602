"""Hostile and careless input to `python -m export.onnx` / `export.torchscript` and `export_onnx`.

Every case checks the same contract: the documented exit status (`export.cli.EXIT_STATUSES`),
exactly one line on stderr that says why and holds no traceback, and nothing new in the output
folder (no file, no staging folder). Most cases fail while the options are parsed, so they call
`main([...])` in-process; the failures of the system (disk full, permission denied) are simulated
by monkeypatching the writer, since the tests run as root, which ignores file permissions. One
subprocess test checks the no-traceback promise and `RLRR_DEBUG` end to end.

Size caps for CI (2 CPU cores): a one-block, 32-wide ViT at 32 px, rank 1, one input per batch
size, no latency runs; the cases that need a written file use TorchScript (traced in a fraction
of a second), and ONNX only where the format matters (determinism, a full disk in the exporter).
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest
import torch
from onnx import numpy_helper

import rlrr
import zoo
from export import files as export_files
from export.cli import EXIT_STATUSES, Terminated, status_of
from export.errors import ExportError, MissingRuntimeError, ModelError, OutputError, ResourceError, VerificationError
from export.files import Staging, remove_stale
from export.onnx import export_onnx
from export.onnx import main as onnx_main
from export.options import LIMITS
from export.pipeline import ModelSpec
from export.torchscript import main as torchscript_main

ROOT = Path(__file__).resolve().parents[1]
KWARGS = {"depth": 1, "embed_dim": 32, "num_heads": 2}  # reason: CI time; one block holds every op type
SPEC = ModelSpec("vit_tiny_patch16_224", 3, 32, KWARGS)
TINY = ["--model", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(KWARGS), "--img-size", "32", "--num-classes", "3",
        "--latency-runs", "0", "--batch-sizes", "1,2", "--inputs", "1", "-q"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def snapshot(folder: Path) -> list[str]:
    """Everything under `folder`, hidden files and staging folders included."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def run(main, argv: list[str], capsys) -> tuple[int, str, str]:
    status = main(argv)
    out, err = capsys.readouterr()
    return status, out, err


def assert_refused(status: int, err: str, expected: int, needle: str) -> None:
    lines = err.strip().splitlines()
    assert status == expected, err
    assert len(lines) == 1, err  # one line says why
    assert "Traceback" not in err
    assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    """Adapter files: a good one, and ones whose metadata a careless or hostile writer filled."""
    d = tmp_path_factory.mktemp("adapters")
    model, _ = zoo.build_model(SPEC.name, num_classes=3, img_size=32, model_kwargs=KWARGS)
    rlrr.apply(model, trainable="head")
    good = {"model": SPEC.name, "num_classes": 3, "img_size": 32, "model_kwargs": KWARGS}
    metas = {
        "good": good,
        "builder": {**good, "model": "os:system", "model_kwargs": {"command": "touch pwned"}},  # code from a file
        "classes_text": {**good, "num_classes": "x"},
        "kwargs_list": {**good, "model_kwargs": [1, 2]},
        "negative_classes": {**good, "num_classes": -4},
        "downloads": {**good, "model_kwargs": {**KWARGS, "pretrained_cfg_overlay": {"file": "/etc/passwd"}}},
    }
    paths = {name: rlrr.save_adapter(model, d / f"{name}.safetensors", metadata=meta) for name, meta in metas.items()}
    with torch.no_grad():  # a diverged training run: NaN in one adapter tensor
        next(p for n, p in model.named_parameters() if "rlrr_" in n).view(-1)[0] = float("nan")
    paths["nan"] = rlrr.save_adapter(model, d / "nan.safetensors", metadata=good)
    (d / "text.safetensors").write_text("not a safetensors file")
    paths["text"] = d / "text.safetensors"
    return paths


# --- 1. numeric options: refused while parsing, before any work --------------------------------

NUMERIC = [
    ("--tolerance", "nan"), ("--tolerance", "inf"), ("--tolerance", "-1e-4"), ("--tolerance", "0"), ("--tolerance", "1"),
    ("--tolerance", "abc"), ("--tolerance", "1e400"),
    ("--batch-sizes", "0"), ("--batch-sizes", "-1"), ("--batch-sizes", "5000"), ("--batch-sizes", "1,99999999999999999999"),
    ("--batch-sizes", ""), ("--batch-sizes", "a,b"), ("--batch-sizes", ",".join(["1"] * 17)), ("--batch-sizes", "1.5"),
    ("--inputs", "0"), ("--inputs", "-3"), ("--inputs", "101"), ("--inputs", "2.0"),
    ("--latency-runs", "-1"), ("--latency-runs", "10001"), ("--warmup", "-1"), ("--warmup", "1e9"),
    ("--opset", "7"), ("--opset", "0"), ("--opset", "999"), ("--opset", "x"),
    ("--img-size", "0"), ("--img-size", "-1"), ("--img-size", "32x0"), ("--img-size", "5000"), ("--img-size", "abc"),
    ("--seed", "-1"), ("--seed", str(2**32)), ("--seed", "1e3"), ("--seed", "NaN"),
    ("--num-classes", "-1"), ("--num-classes", "x"), ("--num-classes", "2000000"),
    ("--rank", "0"), ("--rank", "-2"),
]


@pytest.mark.parametrize(("flag", "value"), NUMERIC, ids=[f"{f}={v[:12]}" for f, v in NUMERIC])
def test_a_bad_number_is_refused_before_any_work(flag, value, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("export.cli.run_export", lambda *a, **k: pytest.fail("run_export must not start"))
    monkeypatch.setattr("export.cli.resolve_spec", lambda *a, **k: pytest.fail("nothing may be read"))
    status, _, err = run(onnx_main, [flag, value, "--out", str(tmp_path / "m.onnx"), "-q"], capsys)
    assert_refused(status, err, 2, flag if flag != "--opset" else "opset")
    assert snapshot(tmp_path) == []


def test_an_option_given_twice_is_refused(tmp_path, capsys):
    status, _, err = run(torchscript_main, [*TINY, "--adapter", "a.safetensors", "--adapter", "b.safetensors", "--out", str(tmp_path / "m.pt")], capsys)
    assert_refused(status, err, 2, "exports one adapter; one file for several tasks is python -m export.onnx")
    status, _, err = run(onnx_main, [*TINY, "--out", str(tmp_path / "a.onnx"), "--out", str(tmp_path / "b.onnx")], capsys)
    assert_refused(status, err, 2, "--out: given twice")
    assert snapshot(tmp_path) == []


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"tolerance": float("nan")}, "tolerance"), ({"tolerance": -1.0}, "tolerance"), ({"batch_sizes": (0, 4)}, "batch size"),
        ({"batch_sizes": (5000,)}, "batch size"), ({"batch_sizes": "14"}, "batch sizes"), ({"batch_sizes": ()}, "number of batch sizes"),
        ({"inputs_per_batch": 0}, "inputs per batch"), ({"seed": -1}, "seed"), ({"seed": 2**70}, "seed"), ({"latency_runs": -5}, "latency"),
        ({"warmup": 1.5}, "warmup"), ({"rank": 0}, "rank"), ({"dtype": "fp8"}, "dtype"), ({"input_shape": (3, 0, 32)}, "image size"),
        ({"input_shape": (3, 32)}, "(C, H, W)"), ({"opset": 7}, "opset"), ({"provider": "tpu"}, "provider"),
        ({"external_data": "maybe"}, "external_data"), ({"batch_sizes": (True, 2)}, "batch size"),
    ],
)
def test_library_options_are_checked_like_the_flags(options, needle, tmp_path):
    with pytest.raises(rlrr.ConfigError, match=re.escape(needle)):
        export_onnx(SPEC, tmp_path / "m.onnx", **options)
    assert snapshot(tmp_path) == []


# --- 2. output paths ---------------------------------------------------------------------------


def _out_cases(tmp_path: Path) -> dict[str, tuple[str, list[str], str]]:
    """name -> (--out, extra flags, what the message says)."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "a_file").write_bytes(b"x")
    (tmp_path / "existing.onnx").write_bytes(b"precious")
    (tmp_path / "json_is_folder.onnx.json").mkdir()
    os.mkfifo(tmp_path / "fifo.onnx")
    return {
        "empty": ("", [], "--out is empty"),
        "blank": ("   ", [], "--out is empty"),
        "tmp_folder": (str(tmp_path), [], "is a folder"),
        "tmp_folder_slash": (str(tmp_path) + "/", [], "is a folder"),
        "folder_no_suffix": (str(tmp_path / "folder"), [], "is a folder"),
        "new_folder_slash": (str(tmp_path / "newdir") + "/", [], "is a folder"),
        "dot": (".", [], "is a folder"),
        "dotdot": ("..", [], "is a folder"),
        "root": ("/", [], "is a folder"),
        "missing_parent": (str(tmp_path / "nowhere" / "m.onnx"), [], "does not exist"),
        "file_as_parent": (str(tmp_path / "a_file" / "m.onnx"), [], "is not a folder"),
        "file_as_grandparent": (str(tmp_path / "a_file" / "sub" / "m.onnx"), [], "does not exist"),
        "nul_byte": (str(tmp_path / "m\x00.onnx"), [], "NUL byte"),
        "existing": (str(tmp_path / "existing.onnx"), [], "--force"),
        "companion_is_folder": (str(tmp_path / "json_is_folder.onnx"), ["--force"], "not a regular file"),
        "fifo_with_force": (str(tmp_path / "fifo.onnx"), ["--force"], "not a regular file"),
        "name_too_long": (str(tmp_path / ("x" * 250 + ".onnx")), [], "too long"),
    }


OUT_CASES = ["empty", "blank", "tmp_folder", "tmp_folder_slash", "folder_no_suffix", "new_folder_slash", "dot", "dotdot", "root", "missing_parent",
             "file_as_parent", "file_as_grandparent", "nul_byte", "existing", "companion_is_folder", "fifo_with_force", "name_too_long"]


@pytest.mark.parametrize("case", OUT_CASES)
def test_an_impossible_out_is_refused_before_any_work(case, tmp_path, capsys, monkeypatch):
    out, extra, needle = _out_cases(tmp_path)[case]
    monkeypatch.chdir(tmp_path / "folder")  # "." and ".." are folders here, and the defaults land nowhere else
    before = snapshot(tmp_path)
    monkeypatch.setattr("export.pipeline._build", lambda *a: pytest.fail("the model must not be built"))
    status, _, err = run(onnx_main, [*TINY, "--out", out, *extra], capsys)
    assert_refused(status, err, 2, needle)
    assert snapshot(tmp_path) == before
    assert (tmp_path / "existing.onnx").read_bytes() == b"precious"


def test_torchscript_folder_out_suggests_its_own_suffix_and_format_must_agree(tmp_path, capsys):
    status, _, err = run(torchscript_main, [*TINY, "--out", str(tmp_path)], capsys)
    assert_refused(status, err, 2, "model.pt")
    status, _, err = run(torchscript_main, [*TINY, "--format", "pt2", "--out", str(tmp_path / "m.pt")], capsys)
    assert_refused(status, err, 2, "make them agree")
    assert snapshot(tmp_path) == []


def test_an_unwritable_folder_is_bad_input(tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path))

    monkeypatch.setattr(export_files.tempfile, "mkdtemp", refuse)  # root ignores chmod: the OS's answer, simulated
    monkeypatch.setattr("export.pipeline._build", lambda *a: pytest.fail("the model must not be built"))
    status, _, err = run(onnx_main, [*TINY, "--out", str(tmp_path / "m.onnx")], capsys)
    assert_refused(status, err, 2, "is not writable")
    assert snapshot(tmp_path) == []


# --- 3. input files ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "make", "needle"),
    [
        ("--adapter", lambda d: "", "empty path"),
        ("--adapter", lambda d: str(d / "missing.safetensors"), "does not exist"),
        ("--adapter", lambda d: str(d), "is a folder"),
        ("--adapter", lambda d: str(d / "a\x00.safetensors"), "NUL byte"),
        ("--adapter", lambda d: "/dev/null", "not a regular file"),
        ("--weights", lambda d: "", "empty path"),
        ("--weights", lambda d: str(d), "is a folder"),
        ("--weights", lambda d: str(d / "missing.pth"), "does not exist"),
        ("--weights", lambda d: str(d / "a\x00.pth"), "NUL byte"),
        ("--weights", lambda d: (d / "model.onnx").write_bytes(b"onnx") and str(d / "model.onnx"), "unknown weight file format '.onnx'"),
        ("--weights", lambda d: (d / "junk.pth").write_bytes(b"\x00junk") and str(d / "junk.pth"), "cannot read weight file"),
        ("--weights", lambda d: (d / "list.pth").write_bytes(b"") or torch.save([1, 2], d / "list.pth") or str(d / "list.pth"), "not a state dict"),
    ],
)
def test_a_bad_input_file_is_refused(flag, make, needle, tmp_path, capsys):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    given = make(inputs)
    out = tmp_path / "out"
    out.mkdir()
    status, _, err = run(onnx_main, [*TINY, flag, given, "--out", str(out / "m.onnx")], capsys)
    assert_refused(status, err, 2, needle)
    assert snapshot(out) == []


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("text", "not a readable safetensors file"),
        ("builder", "cannot make the exporter import code"),
        ("classes_text", "metadata 'num_classes' is 'x'"),
        ("kwargs_list", "metadata 'model_kwargs' is [1, 2]"),
        ("negative_classes", "class count must be a whole number"),
        ("downloads", "would load weights or download"),
        ("nan", "NaN or Inf"),
    ],
)
def test_a_careless_or_hostile_adapter_file_is_refused(name, needle, adapters, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, _, err = run(onnx_main, ["--adapter", str(adapters[name]), "--out", str(tmp_path / "m.onnx"), "--latency-runs", "0", "-q"], capsys)
    assert_refused(status, err, 2, needle)
    assert snapshot(tmp_path) == []  # and os:system did not run: no "pwned"


def test_the_output_is_never_the_adapter(adapters, capsys):
    status, _, err = run(onnx_main, ["--adapter", str(adapters["good"]), "--out", str(adapters["good"]), "--force", "-q"], capsys)
    assert_refused(status, err, 2, "never overwritten")


# --- 4. the model's name and arguments ---------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--model", ""], "--model must be a model name"),
        (["--model", "   "], "--model must be a model name"),
        (["--model", "vit\x00tiny"], "model name must be"),
        (["--model", "вит_тини"], "unknown model"),
        (["--model", "no_such_package_xyz:build"], "cannot be imported"),
        (["--model", "vit_tiny_patch16_224", "--model-kwargs", "[1]"], "must be a JSON object"),
        (["--model", "vit_tiny_patch16_224", "--model-kwargs", '"depth"'], "must be a JSON object"),
        (["--model", "vit_tiny_patch16_224", "--model-kwargs", "{depth: 1}"], "must be a JSON object"),
        (["--model", "vit_tiny_patch16_224", "--model-kwargs", "[" * 100_000], "RecursionError"),
        (["--model", "vit_tiny_patch16_224", "--model-kwargs", '{"num_classes": "x"}'], "--num-classes"),
        (["--model", "vit_tiny_patch16_224", "--model-kwargs", '{"pretrained": true}'], "would load weights or download"),
        (["--model", "vit_tiny_patch16_224", "--model-kwargs", '{"checkpoint_path": "/etc/passwd"}'], "would load weights or download"),
        (["--model", "vit_tiny_patch16_224", "--model-kwargs", '{"a b": 1}'], "argument names"),
    ],
)
def test_a_bad_model_name_or_kwargs_is_refused(args, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, _, err = run(onnx_main, [*args, "--out", str(tmp_path / "m.onnx"), "--latency-runs", "0", "-q"], capsys)
    assert_refused(status, err, 2, needle)
    assert snapshot(tmp_path) == []


@pytest.mark.parametrize(
    ("kwargs", "extra", "status", "needle"),
    [
        ({**KWARGS, "embed_dim": 0}, [], 2, "ZeroDivisionError"),  # the builder crashes on it
        ({**KWARGS, "no_such_argument": 1}, [], 2, "no_such_argument"),
        ({**KWARGS, "глубина": 1}, [], 2, "глубина"),
        (KWARGS, ["--img-size", "8"], 2, "check --img-size"),  # smaller than a 16 px patch
        (KWARGS, ["--img-size", "224", "--batch-sizes", "4096", "--inputs", "100"], 2, "GiB"),  # verification inputs past the budget
    ],
)
def test_a_model_that_cannot_be_built_or_run_as_asked_is_bad_input(kwargs, extra, status, needle, tmp_path, capsys):
    argv = ["--model", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(kwargs), "--num-classes", "3", "--latency-runs", "0", "-q"]
    if "--img-size" not in extra:
        argv += ["--img-size", "32"]
    got, _, err = run(onnx_main, [*argv, *extra, "--out", str(tmp_path / "m.onnx")], capsys)
    assert_refused(got, err, status, needle)
    assert snapshot(tmp_path) == []


# --- 5. the system refusing: a status of its own, never "cannot export" -----------------------


def _enospc(*args, **kwargs):
    try:
        raise OSError(errno.ENOSPC, "No space left on device", "m.onnx")
    except OSError as e:
        raise RuntimeError("the exporter failed while saving") from e  # wrapped, as exporters do


def test_a_full_disk_while_exporting_onnx_exits_5(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.onnx, "export", _enospc)
    status, _, err = run(onnx_main, [*TINY, "--out", str(tmp_path / "m.onnx")], capsys)
    assert_refused(status, err, 5, "No space left on device")
    assert "free some space" in err and "cannot export" not in err
    assert snapshot(tmp_path) == []


@pytest.mark.parametrize(
    ("owner", "attr", "error", "needle"),
    [
        (torch.jit, "save", OSError(errno.ENOSPC, "No space left on device"), "No space left"),
        (torch.jit, "save", OSError(errno.EDQUOT, "Disk quota exceeded"), "quota"),
        (torch.jit, "save", PermissionError(errno.EACCES, "Permission denied"), "Permission denied"),
        (torch.jit, "save", OSError(errno.EROFS, "Read-only file system"), "read-only"),
        (Path, "write_text", OSError(errno.ENOSPC, "No space left on device"), "writing m.pt.json"),  # the report
        (os, "link", PermissionError(errno.EACCES, "Permission denied"), "placing"),
        (os, "open", OSError(errno.EROFS, "Read-only file system"), "read-only"),  # no hard links here, then the fallback
        ("export.pipeline", "reference_outputs", MemoryError(), "out of memory"),
    ],
    ids=["enospc", "quota", "eacces", "erofs", "report", "link", "fallback", "memory"],
)
def test_the_system_refusing_exits_5_and_leaves_nothing(owner, attr, error, needle, tmp_path, capsys, monkeypatch):
    original = getattr(owner, attr) if not isinstance(owner, str) else None

    def refuse(*args, **kwargs):
        if attr == "write_text" and not str(args[0]).endswith(".json"):
            return original(*args, **kwargs)  # the staging folder's owner file
        if attr == "open" and not (len(args) > 1 and args[1] & os.O_EXCL):
            return original(*args, **kwargs)  # only the fallback's exclusive create fails
        raise error

    if attr == "open":  # a file system without hard links (FAT, some shares)
        monkeypatch.setattr(os, "link", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EPERM, "Operation not permitted")))
    if isinstance(owner, str):
        monkeypatch.setattr(f"{owner}.{attr}", refuse)
    else:
        monkeypatch.setattr(owner, attr, refuse)
    status, _, err = run(torchscript_main, [*TINY, "--out", str(tmp_path / "m.pt")], capsys)
    assert_refused(status, err, 5, needle)
    assert snapshot(tmp_path) == []


# --- 6. placing the files: exclusive, all or nothing, stale staging folders ---------------------


def test_an_output_that_appears_meanwhile_is_not_replaced(tmp_path, capsys, monkeypatch):
    """Two runs to one --out both pass the existence check; the second to place its file loses."""
    out = tmp_path / "m.pt"
    commit = Staging.commit

    def race(self, staged):
        out.write_bytes(b"the other run's model")  # it finished first
        return commit(self, staged)

    monkeypatch.setattr(Staging, "commit", race)
    status, _, err = run(torchscript_main, [*TINY, "--out", str(out)], capsys)
    assert_refused(status, err, 2, "appeared meanwhile")
    assert "--force" in err
    assert snapshot(tmp_path) == ["m.pt"] and out.read_bytes() == b"the other run's model"


def test_two_runs_to_one_out_keep_the_first_whole(tmp_path):
    out, companions = tmp_path / "m.onnx", [tmp_path / "m.onnx.json"]
    with Staging(out, companions=companions) as first, Staging(out, companions=companions) as second:  # both pass the checks
        first.commit(_staged(first, ["m.onnx", "m.onnx.json"]))
        second.path("m.onnx").write_bytes(b"second")
        second.path("m.onnx.json").write_bytes(b"second")
        with pytest.raises(OutputError, match="appeared meanwhile"):
            second.commit([(second.path(n), tmp_path / n) for n in ("m.onnx", "m.onnx.json")])
    assert snapshot(tmp_path) == ["m.onnx", "m.onnx.json"]
    assert (tmp_path / "m.onnx").read_bytes() == b"new m.onnx" and (tmp_path / "m.onnx.json").read_bytes() == b"new m.onnx.json"


def _staged(staging: Staging, names: list[str]) -> list[tuple[Path, Path]]:
    pairs = []
    for name in names:
        staging.path(name).write_bytes(b"new " + name.encode())
        pairs.append((staging.path(name), staging.out.with_name(name)))
    return pairs


def test_the_files_are_placed_as_one_unit(tmp_path, monkeypatch):
    out = tmp_path / "m.onnx"
    link = os.link

    def fail_on_json(src, dst, **kwargs):
        if str(dst).endswith(".json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return link(src, dst, **kwargs)

    monkeypatch.setattr(export_files.os, "link", fail_on_json)
    with pytest.raises(ResourceError, match="No space left"), Staging(out, companions=[tmp_path / "m.onnx.json", tmp_path / "m.onnx.data"]) as s:
        s.commit(_staged(s, ["m.onnx.data", "m.onnx", "m.onnx.json"]))
    assert snapshot(tmp_path) == []  # the data file and the model placed before the report are gone again


def test_with_force_a_failed_placement_puts_the_old_files_back(tmp_path, monkeypatch):
    out = tmp_path / "m.onnx"
    for name in ("m.onnx", "m.onnx.json", "m.onnx.data"):
        (tmp_path / name).write_bytes(b"old " + name.encode())
    replace = os.replace

    def fail_on_json(src, dst):
        if str(dst).endswith("m.onnx.json") and "new" in str(src):
            raise OSError(errno.EROFS, "Read-only file system")
        return replace(src, dst)

    monkeypatch.setattr(export_files.os, "replace", fail_on_json)
    companions = [tmp_path / "m.onnx.json", tmp_path / "m.onnx.data"]
    with pytest.raises(ResourceError, match="read-only"), Staging(out, companions=companions, force=True) as s:
        s.commit(_staged(s, ["m.onnx", "m.onnx.json"]))  # this run writes no .data: the stale one would go
    assert snapshot(tmp_path) == ["m.onnx", "m.onnx.data", "m.onnx.json"]
    assert all((tmp_path / n).read_bytes() == b"old " + n.encode() for n in ("m.onnx", "m.onnx.json", "m.onnx.data"))
    monkeypatch.setattr(export_files.os, "replace", replace)
    with Staging(out, companions=companions, force=True) as s:  # and when it works, the stale data file goes
        s.commit(_staged(s, ["m.onnx", "m.onnx.json"]))
    assert snapshot(tmp_path) == ["m.onnx", "m.onnx.json"] and (tmp_path / "m.onnx").read_bytes() == b"new m.onnx"


def test_stale_staging_folders_of_killed_runs_are_removed_live_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = os.getppid()  # the shell or runner that started pytest: running, and not us
    folders = {
        "dead": f".m.onnx.rlrr-{dead.pid}.tmp",  # the older naming
        "dead_other_name": f".other.pt.rlrr-{dead.pid}-k3j_x9.tmp",
        "dead_no_such_pid": ".m.onnx.rlrr-99999999999.tmp",
        "live": f".m.onnx.rlrr-{live}-a1b2c3.tmp",
        "dead_on_another_host": f".m.onnx.rlrr-{dead.pid}-zz.tmp",
        "ours_in_use": None,
    }
    for name, folder in folders.items():
        if folder:
            (tmp_path / folder).mkdir()
            (tmp_path / folder / "m.onnx").write_bytes(b"half")
    (tmp_path / folders["dead_on_another_host"] / "owner").write_text(f"some-other-host\n{dead.pid}\n")
    (tmp_path / ".not-ours.tmp").mkdir()  # not a staging folder name: never touched
    removed = {p.name for p in remove_stale(tmp_path)}
    assert removed == {folders["dead"], folders["dead_other_name"], folders["dead_no_such_pid"]}
    kept = [".not-ours.tmp", folders["live"], folders["dead_on_another_host"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    with Staging(tmp_path / "x.onnx") as in_use, Staging(tmp_path / "x.onnx") as second:  # two exports in one process
        assert remove_stale(tmp_path) == [] and in_use.dir.exists() and second.dir.exists()  # this process's own, in use
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)


def test_a_run_removes_stale_staging_folders_beside_its_output(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".m.pt.rlrr-{dead.pid}.tmp").mkdir()
    status, _, err = run(torchscript_main, [*TINY, "--out", str(tmp_path / "m.pt")], capsys)
    assert status == 0, err
    assert snapshot(tmp_path) == ["m.pt", "m.pt.json"]


# --- 7. determinism -----------------------------------------------------------------------------


def _initializers(path: Path) -> dict:
    return {t.name: numpy_helper.to_array(t).tobytes() for t in onnx.load(str(path)).graph.initializer}


def _numbers(path: Path) -> dict:
    data = json.loads(path.read_text())
    return {k: v for k, v in data.items() if k not in ("timings", "latency", "out", "files")}


def test_the_same_seed_gives_the_same_files_and_the_callers_rng_is_untouched(tmp_path):
    paths = {}
    for run_name, seed in (("a", 0), ("b", 0), ("c", 1)):
        torch.manual_seed(1000 + len(paths))  # a library caller's own RNG use in between
        torch.randn(7)
        state = torch.get_rng_state()
        paths[run_name] = tmp_path / f"{run_name}.onnx"
        export_onnx(SPEC, paths[run_name], seed=seed, batch_sizes=(1, 2), inputs_per_batch=1, latency_runs=0)
        assert torch.equal(torch.get_rng_state(), state), "the global RNG of the caller must stay as it was"
    assert paths["a"].read_bytes() == paths["b"].read_bytes()
    assert _numbers(paths["a"].with_name("a.onnx.json")) == _numbers(paths["b"].with_name("b.onnx.json"))
    a, c = _initializers(paths["a"]), _initializers(paths["c"])
    assert a.keys() == c.keys() and sum(a[k] != c[k] for k in a) >= len(a) // 2  # another seed: other weights


# --- 8. the status table, --debug, and the promise end to end ----------------------------------


def test_every_error_class_has_its_documented_status():
    cases = {
        VerificationError("x"): 1, MissingRuntimeError("x"): 4, ResourceError("x"): 5, ExportError("x"): 3, OutputError("x"): 2,
        ModelError("x"): 2, rlrr.ConfigError("x"): 2, zoo.UnknownModelError("x"): 2, zoo.WeightsFileError("x"): 2, rlrr.AdapterFileError("x"): 2,
        OSError(errno.EIO, "x"): 5, KeyboardInterrupt(): 130, Terminated(): 143, TypeError("a bug"): 70,
    }
    assert {type(e).__name__: status_of(e) for e in cases} == {type(e).__name__: s for e, s in cases.items()}
    assert [row[1] for row in EXIT_STATUSES][:5] == [1, 4, 5, 3, 2]  # subclasses (ResourceError ...) before RLRRError


def test_a_bug_exits_70_with_one_line_and_the_traceback_only_with_debug(tmp_path, capsys, monkeypatch):
    def bug(*args, **kwargs):
        raise TypeError("an internal bug")

    monkeypatch.setattr("export.cli.run_export", bug)
    status, _, err = run(onnx_main, [*TINY, "--out", str(tmp_path / "m.onnx")], capsys)
    assert_refused(status, err, 70, "internal error")
    assert "--debug" in err and "an internal bug" in err
    status, _, err = run(onnx_main, [*TINY, "--out", str(tmp_path / "m.onnx"), "--debug"], capsys)
    assert status == 70 and "Traceback" in err and err.strip().splitlines()[-1].startswith("internal error")
    monkeypatch.setenv("RLRR_DEBUG", "1")
    status, _, err = run(onnx_main, ["--tolerance", "nan"], capsys)
    assert status == 2 and "Traceback" in err  # the environment variable works for every failure


def test_unicode_names_export_and_undecodable_ones_are_refused(tmp_path, capsys):
    status, out, err = run(torchscript_main, [*TINY, "--out", str(tmp_path / "модель 模型.pt")], capsys)
    assert status == 0 and "PASSED" in out, err
    assert snapshot(tmp_path) == ["модель 模型.pt", "модель 模型.pt.json"]
    status, _, err = run(torchscript_main, [*TINY, "--out", str(tmp_path / os.fsdecode(b"\xff\xfe.pt"))], capsys)
    assert_refused(status, err, 2, "not valid UTF-8")
    assert snapshot(tmp_path) == ["модель 模型.pt", "модель 模型.pt.json"]


def test_the_cli_prints_one_line_and_no_traceback_and_rlrr_debug_shows_it(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("RLRR_DEBUG", None)
    done = subprocess.run([sys.executable, "-m", "export.onnx", "--out", ".", "-q"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "is a folder" in done.stderr, done.stderr  # was 70 and a traceback
    assert "Traceback" not in done.stderr and done.stdout == ""
    done = subprocess.run([sys.executable, "-m", "export.onnx", "--out", "/", "-q"], cwd=tmp_path, env={**env, "RLRR_DEBUG": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" in done.stderr and done.stderr.strip().splitlines()[-1].startswith("error: --out / is a folder")
    assert snapshot(tmp_path) == []


def test_sigterm_unwinds_like_ctrl_c_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    """kill / docker stop / timeout, once the model is staged: the staging folder goes, the status says so."""
    from export.torchscript import TorchExporter

    def killed(self, path):
        assert path.exists()  # the folded model is staged
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises at the next bytecode

    monkeypatch.setattr(TorchExporter, "check", killed)
    handler = signal.getsignal(signal.SIGTERM)
    status, _, err = run(torchscript_main, [*TINY, "--out", str(tmp_path / "m.pt")], capsys)
    assert_refused(status, err, 143, "terminated: nothing was written")
    assert snapshot(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) is handler  # put back


def test_a_ctrl_c_a_library_swallowed_still_ends_as_interrupted(tmp_path, capsys, monkeypatch):
    def swallowing(*args, **kwargs):  # onnxruntime's import turns a signal inside it into ImportError
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except KeyboardInterrupt:
            pass
        raise MissingRuntimeError("onnxruntime is not installed")

    monkeypatch.setattr("export.cli.run_export", swallowing)
    status, _, err = run(onnx_main, [*TINY, "--out", str(tmp_path / "m.onnx")], capsys)
    assert_refused(status, err, 130, "interrupted: nothing was written")


def test_limits_are_documented_in_the_help(capsys):
    with pytest.raises(SystemExit):
        onnx_main(["--help"])
    text = capsys.readouterr().out
    for needle in ("--debug", "RLRR_DEBUG", str(LIMITS["batch size"][1]), "  5  the system refused", " 70  an internal error", "each option once"):
        assert needle in text
