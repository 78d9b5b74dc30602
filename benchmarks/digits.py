"""A small real-image task for the quantization benchmark, until `python -m benchmarks.transfer` exists.

What is built (seeded, about 4 minutes on 2 CPU cores), all under one work folder:
1. `digits/`: scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes; shipped with
   scikit-learn, no download) as an ImageFolder, split per class 60/20/20 into train/val/test.
   Fine-tuning reads them at 64 px (bicubic upsampling), like every ImageFolder (finetune.data).
2. `base.safetensors`: the base model, timm `vit_tiny_patch16_224` at 64 px (12 blocks, 16
   patches; 5.5 M parameters) "pretrained" here by full training on the train images of digits
   0-4 only (5 classes): a base that knows strokes, not the task.
3. `rlrr/best.safetensors`: RLRR on all 10 classes with `python -m finetune`'s loop
   (`finetune.finetune`, the zoo's ViT placement, paper init, rank 1, adapters and head training,
   no flip: digits are not mirror-symmetric), best on val.
4. `probe_head.safetensors`: the linear probe: the same frozen base, a fresh 10-class head trained
   on the base's features (AdamW), best on val; tensors named as the head module's own.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

import zoo

MODEL = "vit_tiny_patch16_224"
IMG = 64
SEED = 0
PRETRAIN_CLASSES = 5


def write_digits(root: Path, seed: int = SEED) -> Path:
    """scikit-learn's digits as `root/{train,val,test}/<digit>/<n>.png` (60/20/20 per class, seeded)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    if (root / "test").is_dir():
        return root
    data = load_digits()
    g = torch.Generator().manual_seed(seed)
    tmp = root.with_name(root.name + ".tmp")
    for label in range(10):
        idx = [i for i, y in enumerate(data.target) if y == label]
        order = [idx[i] for i in torch.randperm(len(idx), generator=g).tolist()]
        cut = (round(0.6 * len(order)), round(0.8 * len(order)))
        for split, part in (("train", order[: cut[0]]), ("val", order[cut[0]: cut[1]]), ("test", order[cut[1]:])):
            folder = tmp / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i in part:
                pixels = (data.images[i] * (255 / 16)).round().clip(0, 255).astype("uint8")
                Image.fromarray(pixels, mode="L").save(folder / f"{i:04d}.png")
    tmp.rename(root)
    return root


def _loader(root: Path, split: str, model: nn.Module, classes: range | None, batch: int, shuffle: bool):
    from export import read_images  # the model's own preprocessing, as export and fine-tuning read images

    images = read_images(root / split, model, (3, IMG, IMG))
    keep = torch.ones(len(images.labels), dtype=torch.bool) if classes is None else (images.labels < len(classes))
    ds = torch.utils.data.TensorDataset(images.images[keep], images.labels[keep])
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=shuffle, generator=torch.Generator().manual_seed(SEED))


@torch.no_grad()
def accuracy(model: nn.Module, loader) -> float:
    model.eval()
    right = total = 0
    for x, y in loader:
        right += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return right / total


def pretrain(root: Path, out: Path, epochs: int = 40) -> dict:
    """Full training of the base on digits 0-4 (train split); saves the state dict (5-class head)."""
    from safetensors.torch import save_file

    torch.manual_seed(SEED)
    model, _ = zoo.build_model(MODEL, num_classes=PRETRAIN_CLASSES, img_size=IMG)
    train = _loader(root, "train", model, range(PRETRAIN_CLASSES), 64, True)
    val = _loader(root, "val", model, range(PRETRAIN_CLASSES), 256, False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=epochs * len(train))
    for _ in range(epochs):
        model.train()
        for x, y in train:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
    acc = accuracy(model, val)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out))
    return {"what": f"full training on digits 0-{PRETRAIN_CLASSES - 1}, train split", "epochs": epochs, "val_acc_0_4": acc}


def finetune_rlrr(root: Path, base: Path, out: Path, epochs: int = 30) -> dict:
    """RLRR adapters and head on all 10 digits with the fine-tuning loop."""
    from finetune import FinetuneConfig, finetune

    result = finetune(FinetuneConfig(preset=MODEL, img_size=IMG, weights=str(base), data=str(root), epochs=epochs, batch_size=64,
                                     flip=False, output=str(out), progress="none", device="cpu", seed=SEED, force=True, workers=0))
    return {"what": "finetune.finetune: zoo ViT placement, rank 1, paper init, adapters + head", "epochs": epochs,
            "best_val_acc": result.best_acc, "best_epoch": result.best_epoch, "test": result.test, "file": str(result.files["best"])}


def linear_probe(root: Path, base: Path, out: Path, epochs: int = 100) -> dict:
    """A fresh 10-class head on the frozen base's features, best on val; saved as the head's own tensors."""
    from safetensors.torch import save_file

    torch.manual_seed(SEED)
    model = probe_model(base, None)
    head_name = zoo.classifier_name(model)
    head = model.get_submodule(head_name)
    features = {}
    for split in ("train", "val"):
        loader = _loader(root, split, model, None, 256, False)
        with torch.no_grad():
            feats = [(model.forward_head(model.forward_features(x), pre_logits=True), y) for x, y in loader]
        features[split] = (torch.cat([f for f, _ in feats]), torch.cat([y for _, y in feats]))
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3, weight_decay=1e-4)
    best, best_state = -1.0, None
    (xt, yt), (xv, yv) = features["train"], features["val"]
    for _ in range(epochs):
        for idx in torch.randperm(len(yt)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(head(xt[idx]), yt[idx]).backward()
            opt.step()
        with torch.no_grad():
            acc = float((head(xv).argmax(1) == yv).float().mean())
        if acc > best:
            best, best_state = acc, {k: v.detach().clone().contiguous() for k, v in head.state_dict().items()}
    save_file(best_state, str(out))
    return {"what": "linear probe: frozen base, fresh head trained on its features (AdamW)", "epochs": epochs, "best_val_acc": best}


def probe_model(base: Path, head: Path | None) -> nn.Module:
    """The base model with a 10-class head: fresh, or loaded from a head file."""
    import warnings

    from safetensors.torch import load_file

    model, _ = zoo.build_model(MODEL, num_classes=10, img_size=IMG)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the 5-class pretraining head is left out, as expected
        zoo.load_into(model, base)
    if head is not None:
        model.get_submodule(zoo.classifier_name(model)).load_state_dict(load_file(str(head)))
    return model.eval()


def prepare(work: Path) -> dict:
    """Everything above, reusing what `work` already holds; returns the paths and the training facts."""
    work.mkdir(parents=True, exist_ok=True)
    facts_file = work / "facts.json"
    facts = json.loads(facts_file.read_text()) if facts_file.exists() else {}
    root = write_digits(work / "digits")
    base, adapter, head = work / "base.safetensors", work / "rlrr" / "best.safetensors", work / "probe_head.safetensors"
    if not base.exists():
        facts["pretrain"] = pretrain(root, base)
    if not adapter.exists():
        facts["rlrr"] = finetune_rlrr(root, base, work / "rlrr")
    if not head.exists():
        facts["probe"] = linear_probe(root, base, head)
    facts_file.write_text(json.dumps(facts, indent=2, default=str))
    return {"data": root, "base": base, "adapter": adapter, "head": head, "facts": facts}
