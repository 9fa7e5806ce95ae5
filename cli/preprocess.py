"""``segpipe preprocess`` and ``segpipe inspect``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli._common import handle_errors, state


@handle_errors
def preprocess(
    manifest: Annotated[Path, typer.Option("--manifest", "-m", help="Dataset manifest (see `segpipe manifest`).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Cache folder to fill.", show_default=False)],
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Experiment config: a YAML file or a built-in name (isles22, isles18, wmh17, demo); defaults when omitted.")] = None,
    workers: Annotated[int | None, typer.Option(help="Cases preprocessed in parallel (processes); default: one per CPU core, "
                                                "at most one per case, as many as the memory holds.", show_default=False)] = None,
    keep_going: Annotated[bool, typer.Option("--keep-going", help="Report a failing case and continue with the others.")] = False,
    overrides: Annotated[
        list[str] | None, typer.Argument(help="Config overrides, e.g. preprocess.target_spacing=[1,1,3].", show_default=False)
    ] = None,
) -> None:
    """Fingerprint a dataset, plan the network, and cache every case preprocessed, with its distance maps.

    Resample channels onto the reference grid, reorient to RAS, resample to the target spacing, crop to the
    head, z-score, and compute one signed distance map per foreground class (mm). Reruns process only missing
    or stale cases; every entry is written atomically.
    """
    from segpipe.config import load_config
    from segpipe.data.manifest import load_manifest
    from segpipe.data.preprocess import preprocess_dataset
    from segpipe.errors import SegpipeError, UsageError

    if workers is not None and workers < 1:
        raise UsageError(f"--workers: expected at least 1, got {workers}")
    cfg = load_config(config, overrides or [])
    m = load_manifest(manifest)
    report = preprocess_dataset(m, cfg, out, workers=workers, keep_going=keep_going, debug=state.debug)
    plan = report.plan
    done = len(report.processed) + len(report.up_to_date)
    typer.echo(
        f"cache {out}: {done} cases ready ({len(report.processed)} processed, {len(report.up_to_date)} up to date, "
        f"{len(report.failed)} failed) in {report.seconds:.1f} s"
    )
    if plan is not None:
        fmt = "x".join
        typer.echo(
            f"plan: spacing {fmt(f'{v:g}' for v in plan.target_spacing)} mm, patch {fmt(str(v) for v in plan.patch_size)}, "
            f"batch {plan.batch_size}, {len(plan.network.strides)} stages"
            f"{' (residual encoder)' if plan.network.encoder_blocks else ''}, ~{plan.memory_estimate_gb:g} GiB"
        )
    if report.failed:
        raise SegpipeError(f"{len(report.failed)} case(s) failed: {', '.join(report.failed)} (messages above)")


@handle_errors
def inspect(
    cache: Annotated[Path, typer.Argument(help="Cache folder made by `segpipe preprocess`, a run folder of `segpipe train`, a model "
                                          "(checkpoint, or a folder of the folds' runs, as `segpipe infer --model` takes it), or a DICOM export (folder or ZIP archive).",
                                          show_default=False)],
    case: Annotated[str | None, typer.Argument(help="A case id: show it, and export it with the options below.")] = None,
    export_nifti: Annotated[
        Path | None, typer.Option("--export-nifti", help="Write the case's channels, label and distance maps as NIfTI here.")
    ] = None,
    png: Annotated[Path | None, typer.Option("--png", help="Write a PNG panel of a lesion slice of the case.")] = None,
) -> None:
    """Summarise a preprocessed cache (cases, shapes, spacing, lesions), or look at one case; or summarise a
    training run (fold, loss, progress, best validation score, the last epochs); or describe a model as
    deployed (each checkpoint's SHA-256, fold and score; channels, classes, preprocessing, network, inference
    settings); or list the series of a DICOM export and the ones `segpipe infer` would choose.

    For a case, --export-nifti writes image_CHANNEL.nii.gz, label.nii.gz and sdm_CLASS.nii.gz with the
    preprocessed affine (open them in ITK-SNAP or 3D Slicer), and --png draws the channels, the label and the
    distance map (diverging colours) through the slice with the most lesion.
    """
    from segpipe.data.inspect import (
        case_summary,
        export_case_nifti,
        render_case_png,
        summarize_cache,
    )
    from segpipe.errors import UsageError
    from segpipe.training.runlog import is_run_folder, summarize_model, summarize_run

    if is_run_folder(cache):
        if case is not None or export_nifti or png:
            raise UsageError(f"'{cache}' is a run folder: CASE, --export-nifti and --png are for a cache")
        typer.echo(summarize_run(cache))
        return
    if cache.is_file():
        if case is not None or export_nifti or png:
            raise UsageError(f"'{cache}' is a file: CASE, --export-nifti and --png are for a cache")
        from segpipe.io.archive import is_zip

        if is_zip(cache):  # a DICOM export as a PACS portal hands it out
            from segpipe.data.inspect import summarize_dicom
            from segpipe.io.archive import unpacked

            with unpacked(cache, what="EXPORT") as folder:
                typer.echo(summarize_dicom(folder, name=str(cache)))
            return
        typer.echo(summarize_model(cache))  # a checkpoint (or says clearly what the file is not)
        return
    from segpipe.io.dicom import is_dicom_folder

    if cache.is_dir() and not (cache / "cache.json").is_file() and is_dicom_folder(cache):
        if case is not None or export_nifti or png:
            raise UsageError(f"'{cache}' is a DICOM export: CASE, --export-nifti and --png are for a cache")
        from segpipe.data.inspect import summarize_dicom

        typer.echo(summarize_dicom(cache))
        return
    if cache.is_dir() and not (cache / "cache.json").is_file():
        from segpipe.training.checkpoint import CHECKPOINT_NAMES, run_subfolders

        runs = run_subfolders(cache)
        if any((cache / n).is_file() for n in CHECKPOINT_NAMES) or len(runs) > 1:  # a model, as --model takes it
            if case is not None or export_nifti or png:
                raise UsageError(f"'{cache}' is a model: CASE, --export-nifti and --png are for a cache")
            typer.echo(summarize_model(cache))
            return
        hint = f"; it holds the run {runs[0].name}: inspect that" if runs else ""
        raise UsageError(f"'{cache}': neither a cache (no cache.json), a run folder (no metrics.csv and config.yaml), a model "
                         f"(no checkpoint_best.pt or checkpoint_latest.pt, here or in subfolders) nor a DICOM export{hint}")
    if case is None:
        if export_nifti or png:
            raise UsageError("--export-nifti and --png need a CASE (see `segpipe inspect CACHE` for the ids)")
        typer.echo(summarize_cache(cache))
        return
    typer.echo(case_summary(cache, case))
    if export_nifti:
        written = export_case_nifti(cache, case, export_nifti)
        typer.echo(f"wrote {len(written)} NIfTI files to {export_nifti}")
    if png:
        render_case_png(cache, case, png)
        typer.echo(f"wrote {png}")
