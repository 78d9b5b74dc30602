"""The pretrained backbone, made here: a small ViT trained from scratch on the fractal source task.

The backbone is the zoo's `vit_tiny_patch16_224` family made narrower and shallower for 32 px
inputs (patch 8, width 128, depth 4: 0.8 M parameters). It is pretrained through the fine-tuning
package's own loop (full fine-tuning from random weights) and cached as a safetensors state dict
beside a JSON record (source accuracy, time, a digest of the tensors); both are rebuilt when
missing or when the recipe below changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks import variants
from benchmarks.transfer import fractals, tasks

PRESET = "vit_tiny_patch16_224"  # the zoo's ViT family (placement, head, normalisation)
ARCH = {"patch_size": 8, "embed_dim": 128, "depth": 4, "num_heads": 4}  # builder arguments: 16 tokens of 8x8 px, plus the class token
IMG_SIZE = 32
FILE, RECORD = "backbone.safetensors", "backbone.json"
FORMAT = "rlrr.transfer.backbone/1"


@dataclass(frozen=True)
class Pretraining:
    """The source task and the recipe (AdamW, cosine, warm-up, through `finetune`)."""

    classes: int = 100  # IFS classes
    train: int = 150  # images per class
    val: int = 20
    seed: int = 0
    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 0.05
    batch_size: int = 64  # more updates per epoch: from scratch, 64 learns much faster per image than 128 here
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    threads: int = 2  # fixed, so the weights repeat bit for bit on any machine with the same CPU kind

    def key(self) -> str:
        """Everything the weights depend on."""
        text = json.dumps({"format": FORMAT, "source": self.source_key(), "preset": PRESET, "arch": ARCH, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def source_key(self) -> str:
        """Everything the source images depend on."""
        text = json.dumps({"format": fractals.FORMAT, "img": IMG_SIZE, "classes": self.classes, "train": self.train, "val": self.val,
                           "seed": self.seed}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def default_cache() -> Path:
    """`$RLRR_CACHE/transfer`, else `~/.cache/rlrr/transfer`."""
    root = os.environ.get("RLRR_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "rlrr") / "transfer"


def digest(path: Path) -> str:
    """sha256 of the tensors (names, dtypes, shapes, bytes), not of the file: safetensors writes
    its metadata in no fixed order, so two identical trainings give files that differ there."""
    from safetensors.torch import load_file

    h = hashlib.sha256()
    for name, t in sorted(load_file(str(path)).items()):
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def source_folder(cache: Path, spec: Pretraining) -> Path:
    """The fractal ImageFolder (train/val), written if missing."""
    root = cache / "source"
    manifest = root / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("key") == spec.source_key():
        return root
    task = fractals.fractal_task(spec.classes, {"train": spec.train, "val": spec.val}, spec.seed, IMG_SIZE)
    tmp = root.with_name("source.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tasks.write_imagefolder(task, tmp)
    manifest = json.loads((tmp / "manifest.json").read_text())
    (tmp / "manifest.json").write_text(json.dumps({**manifest, "key": spec.source_key()}, indent=2) + "\n")
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return root


def ensure(cache: Path | None = None, spec: Pretraining = Pretraining(), log=print) -> dict:
    """The cached backbone's record (pretraining it first if missing or stale): file, digest, source accuracy, time."""
    cache = Path(cache) if cache is not None else default_cache()
    record_file, weights = cache / RECORD, cache / FILE
    if record_file.is_file() and weights.is_file():
        record = json.loads(record_file.read_text())
        if record.get("key") == spec.key() and record.get("digest") == digest(weights):
            record["cached"] = True
            return record
    cache.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    log(f"backbone: generating the fractal source task ({spec.classes} classes x {spec.train} + {spec.val} images) in {cache / 'source'}")
    source = source_folder(cache, spec)
    generated = time.perf_counter() - start
    log(f"backbone: pretraining {PRESET} {ARCH} at {IMG_SIZE} px from scratch, {spec.epochs} epochs, {spec.threads} threads "
        f"(full fine-tuning through finetune's loop)")
    result, seconds = pretrain(source, cache / "runs" / "pretrain", spec)
    state = {k: v.detach().contiguous() for k, v in result.model.state_dict().items()}
    from safetensors.torch import save_file

    tmp = weights.with_name(weights.name + ".tmp")
    save_file(state, str(tmp), metadata={"preset": PRESET, "arch": json.dumps(ARCH), "img_size": str(IMG_SIZE), "key": spec.key()})
    tmp.replace(weights)
    last = result.history[-1]
    record = {"key": spec.key(), "file": str(weights), "digest": digest(weights), "preset": PRESET, "arch": ARCH, "img_size": IMG_SIZE,
              "params": sum(v.numel() for k, v in state.items() if not k.startswith("head.")),
              "source": {"data": json.loads((source / "manifest.json").read_text())["data"], "classes": spec.classes,
                         "train": spec.classes * spec.train, "val": spec.classes * spec.val,
                         "val_acc": last["val_acc"], "train_acc": last["train_acc"]},
              "recipe": asdict(spec), "generate_s": round(generated, 1), "pretrain_s": round(seconds, 1),
              "torch": torch.__version__, "cached": False}
    record_file.write_text(json.dumps(record, indent=2) + "\n")
    log(f"backbone: source val accuracy {last['val_acc']:.1%} after {seconds:.0f} s (+ {generated:.0f} s generating); {weights}")
    return record


def pretrain(source: Path, output: Path, spec: Pretraining):
    """Full fine-tuning of the random ViT on the source ImageFolder, through `finetune`."""
    from finetune import FinetuneConfig, finetune

    config = FinetuneConfig(preset=PRESET, model_kwargs=dict(ARCH), img_size=IMG_SIZE, data=str(source), protocol="tune",
                            epochs=spec.epochs, lr=spec.lr, weight_decay=spec.weight_decay, batch_size=spec.batch_size,
                            warmup_epochs=spec.warmup_epochs, label_smoothing=spec.label_smoothing, flip=True, workers=0,
                            seed=spec.seed, output=str(output), force=True, progress="lines", evaluate_test=False, keep_checkpoints=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(spec.threads)
    start = time.perf_counter()
    try:
        result = finetune(config, adapt=variants.full)
    finally:
        torch.set_num_threads(threads)
    return result, time.perf_counter() - start
