"""The options of an export, checked once, before any work: the library and the CLI share these checks.

`LIMITS` holds the range of every whole-number option; the CLI's argparse types call the same
functions, so `--batch-sizes 5000` and `export_onnx(..., batch_sizes=(5000,))` fail alike
(`rlrr.ConfigError`, exit status 2). Paths given by the user are checked as text (empty, NUL
byte, not UTF-8) and input files as files; what a file holds is its reader's business.
"""

from __future__ import annotations

import argparse
import math
import operator
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import rlrr
from export.verify import DEFAULT_TOLERANCE

#: (lowest, highest or None) of each whole-number option; the CLI's flags and run_export's arguments alike
LIMITS = {
    "batch size": (1, 4096),  # reason: a careless 1,4,40000 would allocate for minutes before failing
    "number of batch sizes": (1, 16),
    "inputs per batch": (1, 100),
    "latency runs": (0, 10_000),
    "warmup runs": (0, 1_000),
    "seed": (0, 2**32 - 1),  # make_inputs derives seeds from it; torch's generators take 64 bits
    "rank": (1, None),  # the upper bound depends on the layers: rlrr checks it
    "image size": (1, 4096),
    "class count": (0, 1_000_000),  # 0: a headless model (features)
    "calibration images": (1, 100_000),  # INT8; with the held-out images, also within INPUT_BUDGET once the shape is known
    "held-out images": (1, 100_000),
}
INPUT_BUDGET = 4 * 2**30  # bytes: all seeded verification inputs together (batch sizes x inputs x C x H x W x 4)
#: builder arguments that load weights or reach the network: base weights come from `weights` / --weights only
LOADING_KWARGS = frozenset({"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir", "weights", "weights_backbone"})


def check_int(what: str, value) -> int:
    """`value` as an int within LIMITS[what], or ConfigError saying the range."""
    low, high = LIMITS[what]
    try:
        number = operator.index(value) if not isinstance(value, bool) else None
    except TypeError:
        number = None
    if number is None or number < low or (high is not None and number > high):
        bounds = f"from {low} to {high}" if high is not None else f">= {low}"
        raise rlrr.ConfigError(f"{what} must be a whole number {bounds}, got {value!r}")
    return number


def check_tolerance(value) -> float:
    """A relative tolerance: a finite number above 0 and below 1 (1 would pass any output)."""
    try:
        number = float(value) if not isinstance(value, (bool, str)) else math.nan
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    if not (math.isfinite(number) and 0 < number < 1):
        raise rlrr.ConfigError(f"tolerance must be a finite number above 0 and below 1 (relative to the output's scale), got {value!r}")
    return number


def check_fraction(what: str, value) -> float:
    """A fraction of inputs, within [0, 1] (0.99 = 99 %)."""
    try:
        number = float(value) if not isinstance(value, (bool, str)) else math.nan
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    if not 0.0 <= number <= 1.0:  # NaN fails too
        raise rlrr.ConfigError(f"{what} must be a fraction within [0, 1] (0.99 = 99 % of inputs), got {value!r}")
    return number


def check_img_size(value) -> int | tuple[int, int]:
    """An image size: N, or (H, W), each within LIMITS["image size"]."""
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return (check_int("image size", value[0]), check_int("image size", value[1]))
    return check_int("image size", value)


def check_path(path, what: str, error: type[Exception] = rlrr.ConfigError) -> str:
    """A path given by the user, as text: not empty, no NUL byte (the OS would refuse it later, mid-run)."""
    try:
        text = os.fsdecode(os.fspath(path))
    except TypeError:
        raise error(f"{what} must be a path, got {type(path).__name__}") from None
    if not text.strip():
        raise error(f"{what} is an empty path")
    if "\x00" in text:
        raise error(f"{what} {text!r} contains a NUL byte")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise error(f"{what} {text.encode('utf-8', 'backslashreplace').decode()} is not valid UTF-8: rename the file") from None
    return text


def input_file(path, what: str, error: type[Exception]) -> Path:
    """An input file (adapter, weights) that exists and is a file, or `error` saying what it is instead."""
    p = Path(check_path(path, what, error))
    if p.is_dir():
        raise error(f"{what} {p} is a folder, not a file")
    if not p.exists():
        raise error(f"{what} {p} does not exist")
    if not p.is_file():
        raise error(f"{what} {p} is not a regular file (a device or a pipe?)")
    return p


def check_options(*, dtype: str, dtypes: Sequence[str], batch_sizes: Sequence[int], inputs_per_batch: int, seed: int, rank: int,
                  tolerance: float | None, latency_runs: int, warmup: int) -> tuple[list[int], float]:
    """Every option of an export within LIMITS, before any work: (batch sizes, tolerance); ConfigError if not."""
    if dtype not in dtypes:
        raise rlrr.ConfigError(f"dtype must be one of {tuple(dtypes)}, got {dtype!r}")
    if isinstance(batch_sizes, (str, bytes)) or not hasattr(batch_sizes, "__len__"):
        raise rlrr.ConfigError(f"batch sizes must be a sequence of whole numbers such as (1, 4), got {batch_sizes!r}")
    check_int("number of batch sizes", len(batch_sizes))
    sizes = [check_int("batch size", b) for b in batch_sizes]
    check_int("inputs per batch", inputs_per_batch)
    check_int("seed", seed)
    check_int("rank", rank)
    check_int("latency runs", latency_runs)
    check_int("warmup runs", warmup)
    return sizes, DEFAULT_TOLERANCE[dtype] if tolerance is None else check_tolerance(tolerance)


def check_shape(shape) -> tuple[int, int, int]:
    """An input shape (C, H, W), each within LIMITS["image size"]."""
    try:
        dims = tuple(shape)
    except TypeError:
        dims = ()
    if len(dims) != 3:
        raise rlrr.ConfigError(f"input_shape must be (C, H, W), got {shape!r}")
    return (check_int("image size", dims[0]), check_int("image size", dims[1]), check_int("image size", dims[2]))


def check_budget(shape: Sequence[int], batch_sizes: Sequence[int], inputs_per_batch: int) -> None:
    """The seeded verification inputs fit in INPUT_BUDGET (known once the model says its input shape)."""
    need = 4 * sum(batch_sizes) * inputs_per_batch * math.prod(shape)
    if need > INPUT_BUDGET:
        raise rlrr.ConfigError(f"the verification inputs would take {need / 2**30:.1f} GiB (batch sizes {list(batch_sizes)} x {inputs_per_batch} inputs "
                               f"x {tuple(shape)}), above {INPUT_BUDGET / 2**30:.0f} GiB: use smaller batch sizes or fewer --inputs")


def check_image_budget(shape: Sequence[int], images: int) -> None:
    """INT8's calibration and held-out images, held in memory together, fit in INPUT_BUDGET."""
    need = 4 * images * math.prod(shape)
    if need > INPUT_BUDGET:
        raise rlrr.ConfigError(f"{images} calibration and held-out images of {tuple(shape)} would take {need / 2**30:.1f} GiB, above "
                               f"{INPUT_BUDGET / 2**30:.0f} GiB: use fewer --calibration-images or --eval-images")



def arg_type(check: Callable, parse: Callable = int, *what: str) -> Callable[[str], object]:
    """An argparse type: `parse` the text, then `check(*what, value)` (the library's own check)."""

    def convert(text: str):
        try:
            value = parse(text)
        except (ValueError, OverflowError):
            kind = "a whole number" if parse is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
        try:
            return check(*what, value)
        except rlrr.ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return convert
