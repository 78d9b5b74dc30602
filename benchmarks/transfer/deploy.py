"""Deployment in the loop: fold and export an RLRR adapter with `python -m export.onnx`, then
classify the test split in onnxruntime and compare with the PyTorch model, prediction by prediction.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

BATCH = 100


def test_tensors(data: Path, img_size: int, eval_transform) -> tuple[torch.Tensor, np.ndarray]:
    """The test split through the fine-tuning package's data path and the run's evaluation transform."""
    from finetune import load_data

    source = load_data(data, protocol="tune", img_size=img_size)
    pairs = [source.test[i] for i in range(len(source.test))]
    return torch.stack([eval_transform(img) for img, _ in pairs]), np.array([y for _, y in pairs])


@torch.no_grad()
def torch_predictions(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    model.eval()
    return torch.cat([model(x[i:i + BATCH]).argmax(-1) for i in range(0, len(x), BATCH)]).numpy()


def onnx_predictions(path: Path, x: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # one core per benchmark worker
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    arrays = x.numpy()
    return np.concatenate([session.run(None, {name: arrays[i:i + BATCH]})[0].argmax(-1) for i in range(0, len(arrays), BATCH)])


def export_onnx(adapter: Path, weights: Path, out: Path) -> dict:
    """`python -m export.onnx --adapter ADAPTER --weights WEIGHTS --out OUT`: folds, exports and
    verifies against the unmerged model (its own check, on seeded random inputs); its JSON report."""
    command = [sys.executable, "-m", "export.onnx", "--adapter", str(adapter), "--weights", str(weights), "--out", str(out),
               "--force", "--latency-runs", "0", "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[2])
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    report = Path(str(out) + ".json")
    facts = json.loads(report.read_text()) if report.is_file() else {}
    errors = [o["max_rel"] for o in facts.get("outputs", []) if isinstance(o, dict) and "max_rel" in o]
    return {"command": " ".join(["python", *command[1:]]), "verified": facts.get("verified"),
            "max_rel_error": max(errors) if errors else None, "size_bytes": facts.get("size_bytes")}
