"""`python -m rlrr`: the demo prints the adapted-layer table and fails clearly on bad input."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlrr", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_demo_prints_the_site_table():
    done = run("--model", "vit_tiny_patch16_224", "--num-classes", "5")
    assert done.returncode == 0, done.stderr
    # ViT-Ti: 12 blocks x (qkv, proj, fc1, fc2) = 48 linear (the head is trained in full),
    # 12 x 2 block norms + final norm = 25, and the patch embedding conv.
    assert "sites: 74 (linear 48, conv 1, norm 25)" in done.stdout
    assert "blocks.0.attn.qkv" in done.stdout and "trained in full: head" in done.stdout


def test_demo_reports_a_mistyped_kind():
    done = run("--model", "vit_tiny_patch16_224", "--targets", "lienar")
    assert done.returncode == 2
    assert "did you mean 'linear'" in done.stderr


def test_demo_reports_an_unknown_model():
    done = run("--model", "no_such_model_xyz")
    assert done.returncode == 2
    assert "no_such_model_xyz" in done.stderr
