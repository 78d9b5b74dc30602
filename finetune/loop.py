"""The fine-tuning loop as a function: `finetune(FinetuneConfig(...))`.

    prepare (every check, before training) -> build (seeded) -> [resume] -> DDP
    -> per epoch: train (accumulation, AMP, per-update cosine) -> validate -> files -> state (commit)
    -> the best checkpoint on the test split

Only the adapters and the head train (what `rlrr.apply` leaves trainable); frozen BatchNorm runs
in eval mode. Everything random is seeded: a run on CPU repeats bit for bit, a resumed run equals
the uninterrupted one, and N processes equal one process with the same global batch up to
floating-point summation order (data order and augmentation do not depend on the process count).
A loss or trained tensor that stops being finite ends the run (`DivergedError`) before anything of
that epoch is written.
"""

from __future__ import annotations

import math
import os
import random
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import zoo
from finetune import checkpoint as ckpt
from finetune import distributed
from finetune.config import ADDED_FIELDS, RESOLVED_FIELDS, RUN_FIELDS, FinetuneConfig
from finetune.data import Augmented, DataSource, ShardSampler, load_data, train_sampler, transforms
from finetune.errors import BatchSizeError, CheckpointError, DataError, DivergedError, RecipeError, ResumeMismatchError
from finetune.model import Adapt, Built, build_for_training, copy_trainable, counts, freeze_frozen_norms, metadata, method_name
from finetune.progress import Progress
from finetune.recipe import dataset_recipe, make_loss, make_mixup, make_optimizer, make_scheduler, parameter_groups

Hook = Callable[[str, dict], None]  # ("update" | "epoch", facts): tests interrupt runs through it


@dataclass
class FinetuneResult:
    """What a run produced. `model` holds the last epoch's adapters (unwrapped from DDP)."""

    model: nn.Module
    history: list[dict]
    best_acc: float
    best_epoch: int
    test: dict | None  # the best checkpoint on the test split: {"split", "loss", "acc", "images"}
    output: Path
    classes: list[str]
    files: dict[str, Path] = field(default_factory=dict)
    eval_transform: Callable | None = None  # the run's evaluation transform: evaluate the model (or its export) on other images the same way


@dataclass
class _Plan:
    """Everything decided before training: checked data, recipe, batch split, output, resume state."""

    data: DataSource
    recipe: dict
    resolved: dict
    micro: int  # per-process micro-batch
    output: Path
    state: dict | None
    state_file: Path | None
    img_size: int
    notes: list[str] = field(default_factory=list)  # warnings found while checking (images left out ...)


def seed_everything(seed: int) -> None:
    """torch (all devices), numpy and Python RNGs."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def resolve_amp(amp: str, device: torch.device) -> tuple[str, torch.dtype | None]:
    if amp == "auto":
        amp = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "off"
    if amp == "fp16" and device.type != "cuda":
        raise RecipeError("fp16 mixed precision needs CUDA (and its gradient scaler); on CPU use --amp bf16 or --amp off")
    return amp, {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def _img_size(cfg: FinetuneConfig) -> int:
    return zoo.adapter_metadata(cfg.preset, tiny=cfg.tiny, img_size=cfg.img_size)["img_size"]


def _absolute(path: str | None) -> str | None:
    return None if path is None else str(Path(path).resolve())


def prepare(cfg: FinetuneConfig, d: distributed.Dist) -> _Plan:
    """Every check that can fail, in every process, before anything trains or is written (options: `finetune`)."""
    recipe = cfg.recipe()
    img_size = _img_size(cfg)
    output = Path(cfg.output)
    ckpt.check_output(output, cfg.data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_data(cfg.data, protocol=cfg.protocol, img_size=img_size, generated=cfg.generated,
                         skip_bad_images=cfg.skip_bad_images)
    notes = [str(w.message) for w in caught]
    if cfg.dataset:
        expected = dataset_recipe(cfg.dataset).num_classes
        if data.num_classes != expected:
            raise RecipeError(f"dataset preset {cfg.dataset} is for {expected} classes, but {cfg.data or 'the generated data'} has {data.num_classes}")
    batch, per = recipe["batch_size"], d.world * cfg.accum
    if batch % per:
        lower, upper = batch - batch % per, batch + per - batch % per
        raise BatchSizeError(f"batch size {batch} cannot be split over {d.world} process(es) x {cfg.accum} accumulation step(s): "
                             f"it must be a multiple of {per} (e.g. {lower or upper} or {upper})")
    if batch > len(data.train):
        raise BatchSizeError(f"batch size {batch} is larger than the {len(data.train)} training images: no full batch can be formed")
    amp, _ = resolve_amp(cfg.amp, d.device)
    crop = cfg.crop or data.default_crop
    resolved = {**{k: getattr(cfg, k) for k in RUN_FIELDS}, **recipe, "crop": crop, "amp": amp, "classes": data.classes}
    resolved["data"], resolved["weights"] = _absolute(cfg.data), _absolute(cfg.weights)
    resolved["targets"] = list(cfg.targets) if cfg.targets is not None else None
    resolved["generated"] = cfg.to_dict()["generated"]
    resolved["rank"] = cfg.rank if cfg.rank is not None else zoo.get_preset(cfg.preset).rank
    resolved["img_size"] = img_size
    state = state_file = None
    existing = ckpt.holds_run(output)
    if cfg.resume:
        state_file = ckpt.resolve_resume(cfg.resume, output)
        state = ckpt.load_state(state_file)
        check_same_run(state["config"], resolved, state_file)
        _check_resume_target(output, state_file, resolved, existing, cfg.force)
    elif existing and not cfg.force:
        raise CheckpointError(f"output {output} already holds a run ({', '.join(existing[:4])}): continue it with --resume, "
                              f"start over with --force, or choose another --output")
    return _Plan(data, recipe, resolved, batch // per, output, state, state_file, img_size, notes)


def _check_resume_target(output: Path, source: Path, resolved: dict, existing: list[str], force: bool) -> None:
    """Resuming from a file outside `output` must not overwrite another run that lives there."""
    own = ckpt.list_states(output)
    if not existing or force or _inside(source, output):
        return
    if own:
        try:
            differ = _differences(ckpt.load_state(own[-1][1])["config"], resolved)
        except CheckpointError:
            differ = [f"its newest checkpoint {own[-1][1].name} is unreadable"]
        if not differ:
            return
        raise CheckpointError(f"output {output} holds another run ({'; '.join(differ[:3])}): resuming {source} there would "
                              f"overwrite it; choose another --output, or --force to replace that run")
    raise CheckpointError(f"output {output} already holds files of a run ({', '.join(existing[:4])}) and no checkpoint to match "
                          f"them: resuming {source} there would overwrite them; choose another --output, or --force")


def _inside(path: Path, folder: Path) -> bool:
    return folder.resolve() in path.resolve().parents


def _differences(stored: dict, now: dict) -> list[str]:
    """What differs between a checkpoint's resolved options and this run's (RUN_FIELDS, RESOLVED_FIELDS)."""
    return [f"{k}: checkpoint {stored.get(k, ADDED_FIELDS.get(k))!r}, now {now.get(k)!r}" for k in (*RUN_FIELDS, *RESOLVED_FIELDS)
            if stored.get(k, ADDED_FIELDS.get(k)) != now.get(k)]


def check_same_run(stored: dict, now: dict, source: Path) -> None:
    """A resumed run must compute the same thing: same preset, classes, rank, batch, schedule ..."""
    differ = _differences(stored, now)
    if differ:
        shown = "; ".join(d if len(d) < 200 else d[:200] + "...'" for d in differ[:6])
        raise ResumeMismatchError(f"{source} was written by another run ({len(differ)} difference(s)): {shown}. "
                                  f"Resume with the checkpoint's own options (pass only --resume), or start a new run")


def _loader(dataset, sampler, batch: int, *, workers: int, drop_last: bool, device: torch.device) -> DataLoader:
    return DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=drop_last,
                      pin_memory=device.type == "cuda", persistent_workers=False)


def train_epoch(net: nn.Module, loader: DataLoader, *, epoch: int, optimizer, scheduler, scaler, criterion, mixup, accum: int,
                amp: torch.dtype | None, d: distributed.Dist, step: int, progress: Progress, hook: Hook | None) -> tuple[int, dict]:
    """One epoch of updates; returns the global step and the epoch's loss, accuracy and throughput."""
    net.train()
    freeze_frozen_norms(net)
    loader.sampler.set_epoch(epoch)
    loader.dataset.set_epoch(epoch)
    total, updates = len(loader), math.ceil(len(loader) / accum)
    loss_sum = correct = seen = 0.0
    bad_loss = None  # the first non-finite loss of the current update
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    for i, (x, y) in enumerate(_batches(loader)):
        x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
        target = y
        if mixup is not None and len(x) % 2 == 0:  # timm mixes pairs: an odd last batch trains unmixed
            x, target = mixup(x, y)
        group = min(accum, total - (i // accum) * accum)  # micro-batches in this update
        last = (i + 1) % accum == 0 or i + 1 == total
        with (nullcontext() if last or not d.enabled else net.no_sync()):  # all-reduce once per update
            with torch.autocast(d.device.type, dtype=amp, enabled=amp is not None):
                out = net(x)
                loss = criterion(out, target)
            scaled = loss / group
            (scaler.scale(scaled) if scaler.is_enabled() else scaled).backward()
        value = loss.item()
        if not math.isfinite(value) and bad_loss is None:
            bad_loss = value
        loss_sum += value * len(y)
        correct += (out.argmax(-1) == y).sum().item()
        seen += len(y)
        if last:
            _check_update(bad_loss, d, epoch=epoch + 1, update=i // accum + 1, lr=optimizer.param_groups[0]["lr"])
            if scaler.is_enabled():
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lr = optimizer.param_groups[0]["lr"]
            step += 1
            scheduler.step_update(step)
            elapsed = time.perf_counter() - start
            progress.update((i // accum) + 1, updates, loss_sum / seen, correct / seen, seen * d.world / max(elapsed, 1e-9), lr)
            if hook is not None:
                hook("update", {"epoch": epoch + 1, "step": step})
    seconds = time.perf_counter() - start
    loss_sum, correct, seen = distributed.all_sum([loss_sum, correct, seen], d)
    return step, {"lr": lr, "train_loss": loss_sum / seen, "train_acc": correct / seen, "images_per_s": seen / seconds, "seconds": seconds}


def _batches(loader: DataLoader):
    """The loader's batches; a DataError raised in a worker process comes back with its own message
    (the DataLoader re-raises it with the worker's traceback as text in the message)."""
    try:
        yield from loader
    except DataError as e:
        text = str(e)
        if "DataLoader worker" not in text:
            raise
        raise DataError(text.rpartition(f"{type(e).__name__}: ")[2].strip() or text.splitlines()[0]) from e


def _check_update(bad_loss: float | None, d: distributed.Dist, *, epoch: int, update: int, lr: float) -> None:
    """Before an optimizer step: DivergedError if any process saw a non-finite loss in this update (all
    processes agree, so all stop together, and the step that would spread NaN is never taken)."""
    bad = bad_loss is not None
    if d.enabled:
        bad = distributed.all_sum([float(bad)], d)[0] > 0
    if bad:
        raise DivergedError(f"training diverged: the loss is {bad_loss if bad_loss is not None else 'not finite'} in epoch {epoch}, "
                            f"update {update} (lr {lr:.3g})")


def _check_finite(model: nn.Module, epoch: int) -> None:
    bad = [n for n, p in model.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())]
    if bad:
        raise DivergedError(f"training diverged: {len(bad)} trained tensor(s) are no longer finite after epoch {epoch} "
                            f"(e.g. {bad[0]})")


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, *, amp: torch.dtype | None, d: distributed.Dist) -> dict:
    """Mean cross-entropy and top-1 accuracy over a split, each image once across processes."""
    model.eval()
    loss_sum = correct = seen = 0.0
    for x, y in _batches(loader):
        x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
        with torch.autocast(d.device.type, dtype=amp, enabled=amp is not None):
            out = model(x)
        loss_sum += F.cross_entropy(out.float(), y, reduction="sum").item()
        correct += (out.argmax(-1) == y).sum().item()
        seen += len(y)
    loss_sum, correct, seen = distributed.all_sum([loss_sum, correct, seen], d)
    return {"loss": loss_sum / seen, "acc": correct / seen, "images": int(seen)}


def finetune(config: FinetuneConfig, *, hook: Hook | None = None, adapt: Adapt | None = None) -> FinetuneResult:
    """Fine-tune a zoo preset's adapters and head (see the module docstring); returns the result.

    `adapt` replaces RLRR by another method for comparisons through the same loop: it gets the
    base model (weights loaded) and returns the model to train, with exactly that method's
    parameters requiring grad (`benchmarks.variants`: LoRA, SSF, linear probing, full
    fine-tuning). Its files then hold the trained tensors by name (not an RLRR adapter file), and
    a resumed run must be given the same `adapt`.

    Raises, before training: DataError, BatchSizeError, RecipeError, CheckpointError,
    ResumeMismatchError, and the zoo's errors for unknown presets and weight files. During it:
    DivergedError (a non-finite loss or tensor), ResourceError (a write the file system refused),
    DataError (an image that fails to decode although its header passed the check).
    """
    config.validate()  # before the process group and the device: options first
    d = distributed.setup(config.device)
    try:
        return _run(config, d, hook, adapt)
    finally:
        distributed.teardown(d)


def _run(cfg: FinetuneConfig, d: distributed.Dist, hook: Hook | None, adapt: Adapt | None) -> FinetuneResult:
    plan = prepare(cfg, d)
    progress = Progress("none" if not d.main else cfg.progress, log_every=cfg.log_every)
    recipe, data, amp_name = plan.recipe, plan.data, plan.resolved["amp"]
    _, amp = resolve_amp(amp_name, d.device)

    seed_everything(cfg.seed)  # the same random base and adapters in every process
    built = _build(cfg, plan, adapt)
    model = built.model.to(d.device)
    train_tf, eval_tf = transforms(plan.resolved["crop"], plan.img_size, flip=recipe["flip"], mean=built.mean, std=built.std,
                                   interpolation=built.interpolation)
    workers = cfg.workers if cfg.workers is not None else (0 if data.form == "generated" else min(4, os.cpu_count() or 1))
    train_ds = Augmented(data.train, train_tf, seed=cfg.seed)
    sampler = train_sampler(train_ds, seed=cfg.seed, rank=d.rank, world=d.world, drop_last=recipe["drop_last"])
    train_loader = _loader(train_ds, sampler, plan.micro, workers=workers, drop_last=recipe["drop_last"], device=d.device)
    eval_batch = plan.micro * cfg.accum

    def eval_loader(raw):
        ds = Augmented(raw, eval_tf)
        return _loader(ds, ShardSampler(len(ds), d.rank, d.world), eval_batch, workers=workers, drop_last=False, device=d.device)

    val_loader = eval_loader(data.val)
    updates = math.ceil(len(train_loader) / cfg.accum)
    optimizer = make_optimizer(model, recipe["lr"], recipe["weight_decay"])
    scheduler = make_scheduler(optimizer, epochs=cfg.epochs, updates_per_epoch=updates, warmup_epochs=recipe["warmup_epochs"],
                               cooldown_epochs=cfg.cooldown_epochs, min_lr=cfg.min_lr, warmup_lr=cfg.warmup_lr)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_name == "fp16")
    criterion = make_loss(recipe["label_smoothing"], cfg.mixup)
    mixup = make_mixup(data.num_classes, recipe["label_smoothing"]) if cfg.mixup else None

    history, best_acc, best_epoch, best_tensors, step, start = [], -1.0, 0, None, 0, 0
    if plan.state is not None:
        state = plan.state
        copy_trainable(model, state["trainable"], str(plan.state_file))
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as e:
            raise ResumeMismatchError(f"{plan.state_file}: optimizer state does not fit this model: {e}") from e
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        history, step, start = list(state["history"]), state["global_step"], state["epoch"]
        best_acc, best_epoch, best_tensors = state["best_acc"], state["best_epoch"], state["best_trainable"]
        rngs = state["rng"]
        if len(rngs) == d.world:
            ckpt.set_rng_state(rngs[d.rank])
        else:
            seed_everything(cfg.seed + d.rank + 1000 * start)
            progress.info(f"note: {plan.state_file} was written by {len(rngs)} process(es), this run has {d.world}: random streams "
                          f"(dropout, mixup) are reseeded; data order and augmentation are unchanged")
    else:
        seed_everything(cfg.seed + d.rank)  # per-process streams for dropout and mixup
    scheduler.step_update(step)
    net = distributed.wrap(model, d)

    if d.main:
        with ckpt.storage(f"cannot create the output folder {plan.output}"):
            plan.output.mkdir(parents=True, exist_ok=True)
        stale = ckpt.remove_stale_temp(plan.output)
        if stale:
            plan.notes.append(f"removed {len(stale)} temp file(s) a killed run left in {plan.output}: {', '.join(p.name for p in stale[:5])}")
        if cfg.force and (plan.state is None or not _inside(plan.state_file, plan.output)):  # another run's files go
            for name in ckpt.holds_run(plan.output):
                with ckpt.storage(f"cannot delete {plan.output / name} (--force)"):
                    (plan.output / name).unlink(missing_ok=True)
    _describe(progress, cfg, plan, built, model, d, updates)
    distributed.barrier(d)

    run_info = {**_run_info(cfg, plan, model, d, updates), "method": method_name(adapt)}
    for epoch in range(start, cfg.epochs):
        progress.start_epoch(epoch + 1, cfg.epochs, updates)
        try:
            step, row = train_epoch(net, train_loader, epoch=epoch, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                                    criterion=criterion, mixup=mixup, accum=cfg.accum, amp=amp, d=d, step=step, progress=progress,
                                    hook=hook)
            _check_finite(model, epoch + 1)
            val = evaluate(model, val_loader, amp=amp, d=d)
        except (DivergedError, DataError) as e:  # found mid-run: say what of the run is kept
            progress.end_epoch_early()
            states = ckpt.list_states(plan.output)
            kept = f"the files of epoch {states[-1][0]} are intact" if states else "no epoch was written"
            advice = f". Lower --lr (now {recipe['lr']:g}) or check the data and weights" if isinstance(e, DivergedError) else ""
            raise type(e)(f"{e}; {kept}{advice}") from e
        is_best = val["acc"] > best_acc
        if is_best:
            best_acc, best_epoch, best_tensors = val["acc"], epoch + 1, ckpt.trainable_tensors(model)
        row = {"epoch": epoch + 1, "step": step, **row, "val_loss": val["loss"], "val_acc": val["acc"], "is_best": is_best}
        history.append(row)
        rngs = distributed.gather(ckpt.rng_state(), d)
        saved = []
        if d.main:
            saved = _save_epoch(plan, cfg, built, model, row, history, run_info, best_acc, best_epoch, best_tensors, optimizer, scaler, rngs, step)
        distributed.barrier(d)
        progress.end_epoch(row, saved)
        if hook is not None:
            hook("epoch", dict(row, state_file=ckpt.state_path(plan.output, epoch + 1)))

    test = None
    if data.test is not None and cfg.evaluate_test and best_tensors is not None:
        last = ckpt.trainable_tensors(model)
        copy_trainable(model, best_tensors, "the best checkpoint")
        test = {"split": data.split_names.get("test", "test"), "epoch": best_epoch, **evaluate(model, eval_loader(data.test), amp=amp, d=d)}
        copy_trainable(model, last, "the last epoch")
        progress.info(f"test ({test['split']}, best checkpoint of epoch {best_epoch}): loss {test['loss']:.4f} acc {test['acc']:.1%} on {test['images']} images")
    if d.main:
        ckpt.write_metrics(plan.output, history, _summary(run_info, best_acc, best_epoch, test))
    distributed.barrier(d)
    files = {"last": plan.output / ckpt.LAST, "best": plan.output / ckpt.BEST, "metrics_csv": plan.output / ckpt.METRICS_CSV,
             "metrics_json": plan.output / ckpt.METRICS_JSON}
    if d.main:
        progress.info(f"done: best val acc {best_acc:.1%} at epoch {best_epoch}; files in {plan.output}: {ckpt.LAST}, {ckpt.BEST}, "
                      f"{ckpt.METRICS_CSV}, {ckpt.METRICS_JSON}")
    return FinetuneResult(model, history, best_acc, best_epoch, test, plan.output, data.classes, files, eval_tf)


def _build(cfg: FinetuneConfig, plan: _Plan, adapt: Adapt | None) -> Built:
    """The preset with RLRR at its placement. With an --img-size of the user's, one forward pass on a
    blank image checks the model runs at that size: a failure is bad input, found before any file is written."""
    kwargs = dict(weights=cfg.weights, rank=cfg.rank, init=cfg.init, targets=cfg.targets, img_size=cfg.img_size, tiny=cfg.tiny,
                  drop_path=plan.recipe["drop_path"], model_kwargs=cfg.model_kwargs, adapt=adapt)
    if cfg.img_size is None:
        return build_for_training(cfg.preset, plan.data.num_classes, **kwargs)
    try:
        built = build_for_training(cfg.preset, plan.data.num_classes, **kwargs)
        with torch.no_grad():
            built.model.eval()(torch.zeros(1, 3, plan.img_size, plan.img_size))
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError, AssertionError, IndexError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RecipeError(f"preset {cfg.preset}{' (tiny)' if cfg.tiny else ''} does not run at --img-size {cfg.img_size}: {first[:200]}") from e
    return built


def _save_epoch(plan, cfg, built, model, row, history, run_info, best_acc, best_epoch, best_tensors, optimizer, scaler, rngs, step) -> list[str]:
    """Rank 0: best (if improved), last, metrics, then the state file, the commit point; prune."""
    out, epoch, saved = plan.output, row["epoch"], []
    facts = {"format": ckpt.FORMAT, "epoch": epoch, "val_acc": row["val_acc"], "val_split": plan.data.split_names.get("val", "val"),
             "data": plan.resolved["data"] or "generated", "dataset": cfg.dataset, "recipe": {k: plan.resolved[k] for k in plan.recipe}}
    meta = metadata(model, built, plan.data.classes, facts)
    if row["is_best"]:
        ckpt.save_adapter_file(model, out / ckpt.BEST, meta)
        saved.append(ckpt.BEST)
    ckpt.save_adapter_file(model, out / ckpt.LAST, meta)
    saved.append(ckpt.LAST)
    ckpt.write_metrics(out, history, _summary(run_info, best_acc, best_epoch, None))
    state = {"epoch": epoch, "global_step": step, "config": plan.resolved, "trainable": ckpt.trainable_tensors(model),
             "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else None, "rng": rngs,
             "best_acc": best_acc, "best_epoch": best_epoch, "best_trainable": best_tensors, "history": history}
    path = ckpt.save_state(ckpt.state_path(out, epoch), state)
    ckpt.prune(out, cfg.keep_checkpoints, epoch)
    saved.append(f"{ckpt.STATE_DIR}/{path.name}")
    return saved


def _summary(run_info: dict, best_acc: float, best_epoch: int, test: dict | None) -> dict:
    return {"run": run_info, "best": {"epoch": best_epoch, "val_acc": best_acc}, "test": test}


def _run_info(cfg, plan, model, d, updates) -> dict:
    c = counts(model)
    return {"preset": cfg.preset, "tiny": cfg.tiny, "weights": plan.resolved["weights"], "data": plan.data.description,
            "classes": len(plan.data.classes), "processes": d.world, "micro_batch": plan.micro, "updates_per_epoch": updates,
            "trainable": c["trainable"], "adapter_params": c["adapter"], "head_params": c["head"], "config": plan.resolved,
            "skipped_images": [{"file": f, "why": why} for f, why in plan.data.skipped]}


def _describe(progress: Progress, cfg, plan, built: Built, model, d, updates: int) -> None:
    r, rec = plan.resolved, plan.recipe
    c = counts(model)
    groups = parameter_groups(model, rec["weight_decay"])
    record = zoo.build_record(model)
    weights = cfg.weights or "random (no --weights)"
    progress.info(f"model: {cfg.preset}{' (tiny twin)' if cfg.tiny else ''}: {record.library} {record.model}, {plan.img_size}px, "
                  f"{len(plan.data.classes)} classes; weights: {weights}")
    for note in built.notes:
        progress.info(f"  note: {note}")
    tensors, values = distributed.reduced_tensors(model)
    decay = f"weight decay on {len(groups[0]['params'])} tensors, none on {len(groups[1]['params'])}"
    if built.config is None:
        progress.info(f"method: {built.placement['method']} (not RLRR); trainable {c['trainable']:,} values of {c['total']:,}; {decay}")
    else:
        progress.info(f"adapters: {c['sites']} sites, rank {built.config.rank}, init {cfg.init}; trainable {c['trainable']:,} values "
                      f"= adapters {c['adapter']:,} + head {c['head']:,} of {c['total']:,}; {decay}")
    progress.info(f"data: {plan.data.description}")
    for note in plan.notes:
        progress.info(f"  warning: {note}")
    progress.info(f"recipe: AdamW lr {rec['lr']:g} wd {rec['weight_decay']:g}; cosine to {cfg.min_lr:g}, warm-up {rec['warmup_epochs']:g} "
                  f"epochs ({round(rec['warmup_epochs'] * updates)} updates) from {cfg.warmup_lr:g}, cooldown {cfg.cooldown_epochs:g}; {cfg.epochs} epochs x {updates} updates; "
                  f"batch {rec['batch_size']} = {d.world} process(es) x {plan.micro} x {cfg.accum} accumulation; crop {r['crop']}, "
                  f"flip {'on' if rec['flip'] else 'off'}, label smoothing {rec['label_smoothing']:g}, mixup {'on' if cfg.mixup else 'off'}, "
                  f"drop path {rec['drop_path']:g}; amp {r['amp']}; {d.device}; seed {cfg.seed}"
                  + (f"; dataset preset {cfg.dataset}" if cfg.dataset else ""))
    if d.enabled:
        progress.info(f"distributed: {d.world} processes ({d.backend}); DDP all-reduces {values:,} values in {tensors} tensors "
                      f"(adapters and head only)")
    where = f"resuming from {plan.state_file} (epoch {plan.state['epoch']} of {cfg.epochs})" if plan.state else "new run"
    progress.info(f"output: {plan.output} ({where})")
