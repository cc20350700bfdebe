"""Stop a run whose loss or parameters became NaN or infinite, keeping its last good checkpoint."""

from __future__ import annotations

from pathlib import Path

from springfield.errors import SpringfieldError
from springfield.training import history
from springfield.training.steps import TrainState, all_finite


def check_losses(
    sums: list[dict], first_step: int, workdir: Path, lr: float, saved: int | None
) -> None:
    """Stop at the first step in ``sums`` (step ``first_step`` onwards) with a non-finite loss."""
    bad = history.first_nonfinite(sums, first_step)
    if bad is None:
        return
    step, loss = bad
    stop(f"the training loss became {loss} at step {step}", workdir, lr, saved)


def check_params(state: TrainState, step: int, workdir: Path, lr: float, saved: int | None) -> None:
    """Stop if ``state`` holds a non-finite number; called before each save."""
    # A finite loss at step N was computed before update N: the update itself may still
    # overflow. Checked before each save, so that a saved checkpoint is always a good one.
    if not bool(all_finite(state)):
        stop(f"the model's parameters became NaN or infinite in step {step}", workdir, lr, saved)


def stop(what: str, workdir: Path, lr: float, saved: int | None) -> None:
    """Raise the error that ends a run gone non-finite, naming its last good checkpoint."""
    kept = (
        f"its last good checkpoint (step {saved}) is kept in {workdir / 'checkpoints'}"
        if saved
        else "no checkpoint had been saved yet"
    )
    raise SpringfieldError(
        f"{what}; training stopped and {kept}. Lower --lr (now {lr:g}) and train again in "
        "a new --workdir, or pass --skip-nonfinite to skip such updates."
    )
