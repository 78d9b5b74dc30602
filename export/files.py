"""Atomic output: files are written into a hidden staging folder beside the target, then renamed.

Nothing half-written is left behind: the staging folder goes on any failure (Ctrl-C included),
an existing output is replaced only when asked, and an input file is never a target.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from export.errors import OutputError


def report_path(out: Path) -> Path:
    """The JSON report beside the model: `model.onnx` -> `model.onnx.json`."""
    return out.with_name(out.name + ".json")


def data_path(out: Path) -> Path:
    """ONNX external data beside the model (torch's naming): `model.onnx` -> `model.onnx.data`."""
    return out.with_name(out.name + ".data")


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


class Staging:
    """Stage outputs for `out` and commit them with `os.replace`; use as a context manager.

    Checks, before any work: the folder exists and is writable, `out` is not a folder, none of
    `outputs` (the model and its companions) is one of `inputs`, and none exists unless `force`.
    """

    def __init__(self, out: str | os.PathLike, *, companions: Iterable[Path] = (), inputs: Iterable[str | os.PathLike | None] = (), force: bool = False) -> None:
        self.out = Path(out)
        self.outputs = [self.out, *companions]
        folder = self.out.parent
        if not folder.exists():
            raise OutputError(f"output folder {folder} does not exist (create it first, or choose another --out)")
        if not folder.is_dir():
            raise OutputError(f"output folder {folder} is not a folder")
        if self.out.is_dir():
            raise OutputError(f"output {self.out} is a folder; give a file name such as {self.out / 'model.onnx'}")
        for given in inputs:
            if given is None:
                continue
            for o in self.outputs:
                if _same(o, Path(given)):
                    raise OutputError(f"output {o} is the input file {given}; it is never overwritten: choose another --out")
        existing = [str(o) for o in self.outputs if o.exists()]
        if existing and not force:
            raise OutputError(f"{', '.join(existing)} already exist(s); pass --force (force=True) to overwrite")
        self.dir = folder / f".{self.out.name}.rlrr-{os.getpid()}.tmp"
        try:
            self.dir.mkdir()
        except FileExistsError:
            shutil.rmtree(self.dir, ignore_errors=True)  # left by a killed run with our pid
            self._mkdir()
        except OSError as e:
            raise OutputError(f"output folder {folder} is not writable: {e}") from e

    def _mkdir(self) -> None:
        try:
            self.dir.mkdir()
        except OSError as e:
            raise OutputError(f"output folder {self.out.parent} is not writable: {e}") from e

    def path(self, name: str) -> Path:
        """A path inside the staging folder."""
        return self.dir / name

    def commit(self, staged: Iterable[tuple[Path, Path]]) -> list[Path]:
        """Rename each (staged, final) into place, data before the file that points at it.

        Outputs of an earlier run that this one does not write (a stale `.onnx.data`) are removed.
        """
        staged = list(staged)
        finals = {final for _, final in staged}
        try:
            for stale in self.outputs:
                if stale not in finals and stale.exists():
                    stale.unlink()
            for src, final in staged:
                os.replace(src, final)
        except OSError as e:
            raise OutputError(f"cannot move the export into {self.out.parent}: {e}") from e
        return [final for _, final in staged]

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()
