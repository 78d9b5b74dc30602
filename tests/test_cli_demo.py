"""`python -m zoo.plan`: prints the adapted-layer table of a model built by name and fails clearly on bad input."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zoo.plan", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_plan_prints_the_site_table():
    done = run("--model", "vit_tiny_patch16_224", "--num-classes", "5")
    assert done.returncode == 0, done.stderr
    # ViT-Ti: 12 blocks x (qkv, proj, fc1, fc2) = 48 linear (the head is trained in full),
    # 12 x 2 block norms + final norm = 25, and the patch embedding conv.
    assert "sites: 74 (linear 48, conv 1, norm 25)" in done.stdout
    assert "blocks.0.attn.qkv" in done.stdout and "trained in full: head" in done.stdout


def test_plan_builds_torchvision_models():
    done = run("--model", "torchvision:resnet18", "--num-classes", "5")
    assert done.returncode == 0, done.stderr
    # torchvision ResNet-18: 20 convs (17 in the stem and blocks, 3 downsample); BatchNorm is not a site;
    # its head `fc` (the last nn.Linear) is trained in full
    assert "sites: 20 (linear 0, conv 20, norm 0)" in done.stdout
    assert "layer4.0.downsample.0" in done.stdout and "trained in full: fc" in done.stdout


def test_plan_reports_a_mistyped_kind():
    done = run("--model", "vit_tiny_patch16_224", "--targets", "lienar")
    assert done.returncode == 2
    assert "did you mean 'linear'" in done.stderr


def test_plan_reports_an_unknown_model():
    done = run("--model", "no_such_model_xyz")
    assert done.returncode == 2
    assert "no_such_model_xyz" in done.stderr
