"""``segpipe train``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cli._common import handle_errors


@handle_errors
def train(
    cache: Annotated[Path, typer.Option("--cache", help="Cache folder made by `segpipe preprocess`.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder to write (checkpoints, metrics, plots).", show_default=False)],
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Experiment config (YAML file or built-in name); default: the one the cache was made with.")
    ] = None,
    fold: Annotated[str, typer.Option(help="Cross-validation fold to train (0..k-1), or 'all' for every case.")] = "0",
    loss: Annotated[
        str | None, typer.Option("--loss", help="Loss spec, e.g. dice+boundary, 0.5*ce+dice+boundary, focal+boundary.")
    ] = None,
    schedule: Annotated[
        str | None,
        typer.Option("--schedule", help="Boundary weight schedule: rebalance, increase or constant, with options: rebalance:step=0.02,floor=0.05."),
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Number of epochs (train.epochs).")] = None,
    init_from: Annotated[
        Path | None, typer.Option("--init-from", help="Fine-tune: start from this run folder's or checkpoint's weights (output heads "
                                  "fresh when the classes differ); lower train.learning_rate to taste.", show_default=False)
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run folder.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    amp: Annotated[bool | None, typer.Option("--amp/--no-amp", help="Mixed precision on CUDA (bfloat16 where the GPU computes in it, else float16 with a gradient scaler).")] = None,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the network.")] = False,
    deterministic: Annotated[bool, typer.Option("--deterministic", help="Deterministic algorithms (reproducible, slower).")] = False,
    overrides: Annotated[
        list[str] | None, typer.Argument(help="Config overrides, e.g. train.learning_rate=0.003 plan.batch_size=4.", show_default=False)
    ] = None,
) -> None:
    """Train a 3D U-Net (MONAI DynUNet planned from the data) with the scheduled loss, on cached patches.

    Patches with foreground oversampling and joint augmentation of image, label and distance maps; SGD with
    the poly learning rate (or AdamW); validation on the fold's cases; checkpoints every epoch; --resume
    continues exactly. Several GPUs or machines: start the same command with torchrun.
    """
    from segpipe.errors import UsageError
    from segpipe.losses import parse_loss_spec, parse_schedule
    from segpipe.training.trainer import resolve_train_config
    from segpipe.training.trainer import train as run

    extra = list(overrides or [])
    try:
        if loss is not None:
            parse_loss_spec(loss)
            extra.append(f"loss.spec={loss}")
        if schedule is not None:
            parse_schedule(schedule)
            extra.append(f"loss.schedule={schedule}")
    except ValueError as exc:
        raise UsageError(f"--loss/--schedule: {exc}") from None
    if epochs is not None:
        if epochs < 1:
            raise UsageError(f"--epochs: expected at least 1, got {epochs}")
        extra.append(f"train.epochs={epochs}")
    if amp is not None:
        extra.append(f"train.amp={str(amp).lower()}")
    if compile:
        extra.append("train.compile=true")
    if deterministic:
        extra.append("train.deterministic=true")
    if init_from is not None:
        extra.append(f"train.init_from={json.dumps(str(init_from.resolve()))}")  # a quoted YAML string: any path stays a string
    cfg = resolve_train_config(cache, config, extra)
    result = run(cfg, cache, out, fold=fold, resume=resume, overwrite=overwrite, device=device)
    best = (f"; best validation {cfg.train.best_metric} {result.best_metric:.4f} at epoch {result.best_epoch}"
            if result.best_metric is not None else "")
    typer.echo(f"trained {result.epochs_run} epochs (last {result.last_epoch}){best}")
    typer.echo(f"run folder {out}: checkpoint_best.pt, checkpoint_latest.pt, metrics.csv, progress.png, train.log")
