"""Progress on stderr: a tqdm bar per epoch (on a terminal) or compact lines, and one line per epoch.

Only rank 0 reports. "none" (`--quiet`) reports nothing; errors still reach the caller.
"""

from __future__ import annotations

import sys


class Progress:
    """Reports one run. `mode`: "auto" (bar on a terminal, else lines), "bar", "lines" or "none"."""

    def __init__(self, mode: str = "auto", *, log_every: int = 0, stream=None) -> None:
        """`log_every`: in lines mode, a line every N updates; 0: about ten an epoch when it has 20 or more."""
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "lines"
        if mode == "bar":
            try:
                import tqdm  # noqa: F401  (a dependency of timm's huggingface_hub; optional here)
            except ImportError:
                mode = "lines"
        self.mode, self.log_every = mode, log_every
        self._bar = None

    def info(self, text: str) -> None:
        """A line about the run (model, data, recipe, files)."""
        if self.mode != "none":
            print(text, file=self.stream, flush=True)

    def start_epoch(self, epoch: int, epochs: int, updates: int) -> None:
        self._epoch, self._epochs = epoch, epochs
        self._every = self.log_every or (updates // 10 if updates >= 20 else 0)  # auto: about 10 lines an epoch
        if self.mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=updates, desc=f"epoch {epoch}/{epochs}", unit="upd", file=self.stream, leave=False, dynamic_ncols=True)

    def update(self, step: int, updates: int, loss: float, acc: float, images_per_s: float, lr: float) -> None:
        """After each optimizer update: running loss and accuracy of the epoch, throughput, lr."""
        if self._bar is not None:
            self._bar.set_postfix_str(f"loss {loss:.4f} acc {acc:.1%} {images_per_s:.0f} img/s lr {lr:.2e}", refresh=False)
            self._bar.update(1)
        elif self.mode == "lines" and self._every and (step % self._every == 0 or step == updates):
            self.info(f"  epoch {self._epoch}/{self._epochs} update {step}/{updates}: loss {loss:.4f} acc {acc:.1%} "
                      f"{images_per_s:.0f} img/s lr {lr:.2e}")

    def end_epoch_early(self) -> None:
        """The epoch stopped (an error): close the bar so the error line starts on a clean line."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def end_epoch(self, row: dict, saved: list[str]) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        best = " *best*" if row["is_best"] else ""
        self.info(f"epoch {row['epoch']}/{self._epochs}  lr {row['lr']:.2e}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.1%}  "
                  f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.1%}{best}  {row['images_per_s']:.0f} img/s  "
                  f"{row['seconds']:.1f}s" + (f"  -> {', '.join(saved)}" if saved else ""))
