"""Atomic output: files are written into a hidden staging folder beside the target, then placed.

Nothing half-written is left behind: the staging folder goes on any failure (Ctrl-C included),
and the next run removes those of killed runs; an existing output is replaced only when asked,
and an input file is never a target. The model, its data file and its report are placed as one
unit: if one cannot be placed, those this run already placed are removed again (and, with
`force`, the files they replaced are put back). Without `force` placing is exclusive, so two
runs racing for one output cannot replace each other's file.

    .NAME.rlrr-PID-XXXX.tmp/      beside NAME
        owner                     host and pid of the writer (for the stale check)
        new/                      the files being written
        old/                      outputs this run replaces (force), until it is done
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path

from export.errors import OutputError, refusal

STAGING = re.compile(r"^\..+\.rlrr-(?P<pid>\d+)(?:-\w+)?\.tmp$")  # a staging folder, ours or a killed run's
_HOST = socket.gethostname()
_LIVE: set[str] = set()  # real paths of this process's staging folders in use (threads may export at once)
_LOCK = threading.RLock()  # a folder is created and marked live before another thread looks for stale ones
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS}
_NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT}


def report_path(out: Path) -> Path:
    """The JSON report beside the model: `model.onnx` -> `model.onnx.json`."""
    return out.with_name(out.name + ".json")


def data_path(out: Path) -> Path:
    """ONNX external data beside the model (torch's naming): `model.onnx` -> `model.onnx.data`."""
    return out.with_name(out.name + ".data")


def output_path(out: str | os.PathLike, suffix: str = "") -> Path:
    """`out` as a file path to write, or OutputError saying why it cannot be one (before any work)."""
    text = os.fsdecode(os.fspath(out))
    example = f"model{suffix or '.onnx'}"
    if not text.strip():
        raise OutputError(f"--out is empty: give a file name such as {example}")
    if "\x00" in text:
        raise OutputError(f"--out {text!r} contains a NUL byte: give a plain file name such as {example}")
    if not _utf8(text):  # torch's writers and ONNX's external-data names take text, not raw bytes
        raise OutputError(f"--out {text.encode('utf-8', 'backslashreplace').decode()} is not valid UTF-8: give a file name in UTF-8")
    path = Path(text)
    if text.endswith(("/", os.sep)) or path.name in ("", ".", "..") or path.is_dir():
        raise OutputError(f"--out {text} is a folder; give a file name such as {path / example}")
    folder = path.parent
    if not folder.exists():
        raise OutputError(f"output folder {folder} does not exist (create it first, or choose another --out)")
    if not folder.is_dir():
        raise OutputError(f"output folder {folder} is not a folder")
    return path


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes of a file name, as Python's surrogate escapes
        return False
    return True


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except (OSError, ValueError):
        return False


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OverflowError:  # no process has such a pid
        return False
    except OSError:  # PermissionError: it runs, as another user
        return True
    return True


def _owner_host(folder: Path) -> str | None:
    try:
        return (folder / "owner").read_text().split("\n", 1)[0]
    except FileNotFoundError:
        return None  # killed before it wrote one, or an older version's: the pid decides
    except (OSError, UnicodeDecodeError):
        return "?"  # unreadable: not provably ours, keep it


def remove_stale(folder: Path) -> list[Path]:
    """Remove the staging folders in `folder` whose writer no longer runs (killed runs' left-overs).

    A folder is stale when its pid runs nowhere on this host (`os.kill(pid, 0)` says
    ProcessLookupError), or is this process's and not in use; one written on another host (a
    shared network folder) is never touched, nor one of a live process, whoever owns it.
    """
    removed = []
    with _LOCK:
        try:
            entries = list(folder.iterdir())
        except OSError:
            return removed
        for entry in entries:
            m = STAGING.match(entry.name)
            if not m or os.path.realpath(entry) in _LIVE or entry.is_symlink() or not entry.is_dir():
                continue
            pid = int(m["pid"])
            alive = _running(pid) if pid != os.getpid() else False
            if not alive and _owner_host(entry) in (None, _HOST):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


class Staging:
    """Stage outputs for `out` and place them together; use as a context manager.

    Checks, before any work: `out` is a usable file path in an existing, writable folder, none of
    `outputs` (the model and its companions) is one of `inputs`, none is a folder or a device,
    and none exists unless `force`.
    """

    def __init__(self, out: str | os.PathLike, *, companions: Iterable[Path] = (), inputs: Iterable[str | os.PathLike | None] = (),
                 force: bool = False, suffix: str = "") -> None:
        self.out = output_path(out, suffix)
        self.outputs = [self.out, *companions]
        self.force = force
        folder = self.out.parent
        for given in inputs:
            if given is None:
                continue
            for o in self.outputs:
                if _same(o, Path(given)):
                    raise OutputError(f"output {o} is the input file {given}; it is never overwritten: choose another --out")
        existing = [o for o in self.outputs if os.path.lexists(o)]
        for o in existing:
            if not (o.is_symlink() or o.is_file()):
                raise OutputError(f"{o} exists and is not a regular file (a folder or a device): choose another --out; --force replaces only files")
        if existing and not force:
            raise OutputError(f"{', '.join(map(str, existing))} already exist(s); pass --force (force=True) to overwrite")
        with _LOCK:
            remove_stale(folder)
            try:
                self.dir = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.rlrr-{os.getpid()}-", suffix=".tmp", dir=folder))
            except OSError as e:
                if e.errno == errno.ENAMETOOLONG:
                    raise OutputError(f"--out name {self.out.name!r} is too long for the file system") from e
                if e.errno in _NOT_WRITABLE:
                    raise OutputError(f"output folder {folder} is not writable: {e.strerror}") from e
                raise refusal(e, f"creating a staging folder in {folder}") or OutputError(f"cannot write into {folder}: {e}") from e
            _LIVE.add(os.path.realpath(self.dir))
        try:
            (self.dir / "owner").write_text(f"{_HOST}\n{os.getpid()}\n")
            (self.dir / "new").mkdir()
            (self.dir / "old").mkdir()
        except OSError as e:
            self.cleanup()
            raise refusal(e, f"writing into {folder}") or OutputError(f"cannot write into {folder}: {e}") from e

    def path(self, name: str) -> Path:
        """A path inside the staging folder."""
        return self.dir / "new" / name

    def write_text(self, name: str, text: str) -> Path:
        """Write a staged text file (the report)."""
        path = self.path(name)
        try:
            path.write_text(text, encoding="utf-8")
        except OSError as e:
            raise refusal(e, f"writing {name}") or OutputError(f"cannot write {path}: {e}") from e
        return path

    def commit(self, staged: Iterable[tuple[Path, Path]]) -> list[Path]:
        """Place each (staged, final), data before the file that points at it; all of them or none.

        Without `force`, a final that appeared since the checks (another run) is an OutputError;
        with it, outputs are replaced, and outputs of an earlier run that this one does not
        write (a stale `.onnx.data`) are removed.
        """
        staged = list(staged)
        finals = [final for _, final in staged]
        placed: list[tuple[Path, tuple[int, int]]] = []  # final, (device, inode): removed again on failure
        saved: list[tuple[Path, Path]] = []  # (backup, final): put back on failure
        final = self.out
        try:
            if self.force:
                for i, o in enumerate(self.outputs):
                    if os.path.lexists(o):
                        backup = self.dir / "old" / str(i)
                        if o not in finals:
                            os.replace(o, backup)  # a stale companion this run does not write
                            saved.append((backup, o))
                        elif _try_link(o, backup):  # the old file stays in place until ours replaces it
                            saved.append((backup, o))
            for src, final in staged:
                if self.force:
                    os.replace(src, final)
                else:
                    _place_exclusive(src, final)
                st = os.stat(final, follow_symlinks=False)
                placed.append((final, (st.st_dev, st.st_ino)))
        except BaseException as e:
            _undo(placed, saved)
            if isinstance(e, FileExistsError):
                raise OutputError(f"{final} appeared meanwhile (another export to the same --out?); nothing of this run was kept; "
                                  "pass --force to overwrite") from e
            if isinstance(e, OSError):
                raise refusal(e, f"placing {final}") or OutputError(f"cannot move the export into {self.out.parent}: {e}") from e
            raise
        return finals

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        _LIVE.discard(os.path.realpath(self.dir))

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()


def _try_link(src: Path, dst: Path) -> bool:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        return False  # no hard links here: the old file cannot be put back if placing fails
    return True


def _place_exclusive(src: Path, final: Path) -> None:
    """Put `src` at `final` unless something is there already (FileExistsError), atomically."""
    try:
        os.link(src, final, follow_symlinks=False)
        return
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in _NO_HARD_LINKS:
            raise
    # no hard links on this file system (FAT, some network shares): reserve the name, then replace
    os.close(os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        os.replace(src, final)
    except BaseException:
        final.unlink(missing_ok=True)
        raise


def _undo(placed: list[tuple[Path, tuple[int, int]]], saved: list[tuple[Path, Path]]) -> None:
    for final, ident in reversed(placed):
        try:
            st = os.stat(final, follow_symlinks=False)
            if (st.st_dev, st.st_ino) == ident:  # still ours, not another run's since
                final.unlink()
        except OSError:
            pass
    for backup, final in reversed(saved):
        try:
            os.replace(backup, final)
        except OSError:
            pass
