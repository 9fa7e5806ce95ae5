"""``segpipe infer``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli._common import handle_errors, parse_pairs


@handle_errors
def infer(
    inputs: Annotated[
        list[str] | None,
        typer.Argument(help="Manifest (.json), DICOM export folder (or its ZIP archive), folder of NIfTI files, or NIfTI files of one case.", show_default=False),
    ] = None,
    model: Annotated[
        list[str],
        typer.Option("--model", "-m", help="Run folder of `segpipe train`, or a checkpoint file. Repeat for an ensemble (e.g. the "
                     "folds): the class probabilities are averaged.", show_default=False),
    ] = ...,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the masks, DICOM SEGs and SRs (DICOM input) and summary.json.", show_default=False)] = ...,
    channel: Annotated[list[str] | None, typer.Option("--channel", help="NAME=PATH: the file of one channel (repeat for each).")] = None,
    tta: Annotated[
        bool | None, typer.Option("--tta/--no-tta", help="Mirror test-time augmentation (8 flips; --no-tta is about 8x faster). Default: infer.tta (on).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    overlap: Annotated[
        float | None, typer.Option("--overlap", help="Overlap of the sliding windows, a fraction of the window (nnU-Net's step "
                                   "size 0.5 is overlap 0.5; less is faster). Default: infer.overlap (0.5).", show_default=False)
    ] = None,
    min_lesion_mm3: Annotated[
        float | None, typer.Option("--min-lesion-mm3", help="Remove predicted lesions smaller than this (mm^3). Default: infer.min_lesion_mm3.")
    ] = None,
    save_probabilities: Annotated[bool, typer.Option("--save-probabilities", help="Also write the foreground probabilities as NIfTI.")] = False,
    series: Annotated[list[str] | None, typer.Option("--series", help="CHANNEL=SERIESNUMBER: which DICOM series is that channel.")] = None,
    dicom_case: Annotated[
        str, typer.Option("--dicom-case", help="A DICOM folder is one case per study ('study'), or one case whatever its studies "
                          "and patients ('folder': an anonymiser gave each series a study of its own).")
    ] = "study",
    allow_uneven: Annotated[bool, typer.Option("--allow-uneven", help="Resample DICOM series with uneven slices instead of failing.")] = False,
    workers: Annotated[int, typer.Option(help="Processes to split many inputs over (each loads the model once).")] = 1,
    preprocess_workers: Annotated[
        int | None,
        typer.Option("--preprocess-workers", help="Processes that read and preprocess the next cases while the network works "
                     "(several inputs, one model). Default: 3 on a GPU when the cases are large enough to gain, else 0.", show_default=False),
    ] = None,
    skip_existing: Annotated[
        bool, typer.Option("--skip-existing", help="Leave cases whose outputs are already in --out (continue an interrupted run).")
    ] = False,
    cross_validation: Annotated[
        bool, typer.Option("--cross-validation", help="INPUT is the manifest (or dataset folder) the models were trained from: segment each case only "
                           "with the fold model(s) that held it out, for a cross-validation score (`segpipe evaluate`).")
    ] = False,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="A config (YAML file or built-in name) whose 'infer' section (overlap, TTA, DICOM rules...) replaces the model's.")
    ] = None,
    dicom_seg: Annotated[
        bool, typer.Option("--dicom-seg/--no-dicom-seg", help="For DICOM input, also write the DICOM SEG and the SR with the lesion volumes.")
    ] = True,
    dicom_overlay: Annotated[
        bool, typer.Option("--dicom-overlay", help="For DICOM input, also write CASE_overlay/: a copy of the series with the lesion "
                           "outlines as DICOM overlay planes, for PACS viewers that do not show DICOM SEG.")
    ] = False,
) -> None:
    """Segment scans with a trained model; masks come out in each input's own geometry.

    The checkpoint holds the preprocessing plan, so nothing else is needed. NIfTI outputs keep the input's
    affine and header codes; DICOM exports also get a DICOM SEG referencing the source series and a DICOM SR
    with each segment's lesion volume and count (--no-dicom-seg: NIfTI only); --dicom-overlay adds a copy of
    the series with the outlines as overlay planes, for viewers without DICOM SEG. A failing case
    is reported and the others go on (exit code 1 at the end).
    """
    from segpipe.config import load_config
    from segpipe.errors import SegpipeError
    from segpipe.inference.run import infer as run
    from segpipe.progress import track

    infer_config = load_config(config).infer if config is not None else None
    report = run(model, inputs or [], out, channel_map=parse_pairs(channel, "--channel"), tta=tta, device=device,
                 min_lesion_mm3=min_lesion_mm3, save_probabilities=save_probabilities,
                 series=parse_pairs(series, "--series", as_int=True), allow_uneven=allow_uneven, workers=workers, dicom_seg=dicom_seg,
                 dicom_overlay=dicom_overlay,
                 preprocess_workers=preprocess_workers, skip_existing=skip_existing, cross_validation=cross_validation,
                 dicom_case=dicom_case, overlap=overlap,
                 infer_config=infer_config, progress=track)
    for cid, info in report.done.items():
        lesions = "; ".join(f"{k}: {v['lesions']} lesions, {v['volume_ml']:.2f} ml" for k, v in info["lesions"].items())
        typer.echo(f"{cid}: {lesions} -> {', '.join(info['outputs'])}")
    skipped = f", {len(report.skipped)} skipped (outputs already there)" if report.skipped else ""
    typer.echo(f"{len(report.done)} done, {len(report.failed)} failed{skipped} in {report.seconds:.1f} s; summary in {out / 'summary.json'}")
    if cross_validation and report.done:
        typer.echo(f"cross-validation predictions: score them with `segpipe evaluate --pred {out} --gt {inputs[0]}` "
                   "(the challenge's protocol follows the dataset's layout; --protocol chooses another)")
    if report.failed:
        raise SegpipeError(f"{len(report.failed)} case(s) failed", details=[f"{k}: {v}" for k, v in report.failed.items()])
