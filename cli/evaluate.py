"""``segpipe evaluate``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli._common import handle_errors


@handle_errors
def evaluate(
    pred: Annotated[Path, typer.Option("--pred", help="Folder of predicted masks named by case id: CASE.nii.gz (what `segpipe infer` writes), or another tool's (NRRD, MetaImage, DICOM SEG CASE.dcm).", show_default=False)],
    gt: Annotated[Path, typer.Option("--gt", help="Folder of ground-truth masks named by case id (NIfTI, NRRD, MetaImage or DICOM SEG), a dataset folder in a known layout, or a manifest.", show_default=False)],
    protocol: Annotated[str, typer.Option(help="auto: the ground truth's dataset layout's (WMH 2017: wmh17; ISLES 2015 or 2018: isles15), "
                                          "else isles22. isles22: Dice, AVD ml, lesion count difference, lesion F1. wmh17: Dice, HD95, AVD %, "
                                          "lesion recall, lesion F1. isles15: Dice, ASSD, Hausdorff distance, precision, recall, volume "
                                          "error mm^3.")] = "auto",
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the per-case and mean metrics as JSON.")] = None,
    csv_out: Annotated[Path | None, typer.Option("--csv", help="Write them as CSV (one row per case, then the mean).")] = None,
    ignore_missing: Annotated[bool, typer.Option("--ignore-missing", help="Evaluate the cases found on both sides instead of failing.")] = False,
    min_lesion_mm3: Annotated[
        str | None, typer.Option("--min-lesion-mm3", help="Remove predicted lesions smaller than this (mm^3) before scoring; "
                                 "several, comma-separated (0,10,50), compare the means, to choose `infer --min-lesion-mm3` on "
                                 "cross-validation predictions.", show_default=False)
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Cases scored in parallel (processes); default: one per CPU core, at most one "
                                                "per case.", show_default=False)] = None,
    baseline: Annotated[Path | None, typer.Option("--baseline", help="A second folder of predictions (another model, loss or "
                                                  "setting) to compare with, case by case: mean differences with 95 % bootstrap "
                                                  "intervals and Wilcoxon signed-rank p-values.", show_default=False)] = None,
    lesions: Annotated[Path | None, typer.Option("--lesions", help="Write every lesion as CSV (each ground-truth lesion: volume, "
                                                 "detected or not, centre in mm; each false-positive component) and print the "
                                                 "detection rate by lesion size.", show_default=False)] = None,
) -> None:
    """Score predictions against ground truth with a challenge's own metrics, number for number.

    isles22 follows the ISLES 2022 organisers' eval_utils.py; wmh17 follows the WMH 2017 organisers'
    evaluation.py (label 2 of the ground truth is ignored); isles15 follows the ISLES 2015 and 2016 organisers'
    validateLabelImages-ISLES. Prints a table; --json and --csv write reports.
    """
    from segpipe.errors import UsageError
    from segpipe.evaluation.protocols import evaluate as run
    from segpipe.evaluation.protocols import format_table, write_report
    from segpipe.progress import track

    sizes = [0.0]
    if min_lesion_mm3 is not None:
        try:
            sizes = [float(v) for v in min_lesion_mm3.split(",")]
        except ValueError:
            raise UsageError(f"--min-lesion-mm3: expected sizes in mm^3, comma-separated (e.g. 0,10,50), got '{min_lesion_mm3}'") from None
    from segpipe.io.atomic import ensure_writable_file

    for option, path, example in (("--json", json_out, "evaluation.json"), ("--csv", csv_out, "evaluation.csv"),
                                  ("--lesions", lesions, "lesions.csv")):
        if path is not None:  # before the scoring, not after it
            ensure_writable_file(path, what=option, example=example)
    if baseline is not None and not baseline.is_dir():  # before the scoring, not after it
        from segpipe.errors import SegpipeError

        found = "nothing there" if not baseline.exists() else "a file"
        raise SegpipeError(f"--baseline '{baseline}': expected a folder of predictions to compare with (`segpipe infer --out`), found {found}")
    report = run(pred, gt, protocol, ignore_missing=ignore_missing, min_lesion_mm3=sizes, progress=track, workers=workers,
                 lesions=lesions is not None)
    if baseline is not None:
        from segpipe.evaluation.protocols import compare, format_comparison

        other = run(baseline, gt, report["protocol"], ignore_missing=ignore_missing, min_lesion_mm3=sizes[:1], progress=track, workers=workers)
        report["comparison"] = {"baseline": str(baseline), "metrics": compare(report, other)}
    write_report(report, json_out, csv_out, lesions)
    typer.echo(format_table(report))
    if baseline is not None:
        typer.echo("")
        typer.echo(format_comparison(report["comparison"]["metrics"], Path(pred).name or str(pred), Path(baseline).name or str(baseline)))
    for path in (json_out, csv_out, lesions):
        if path:
            typer.echo(f"wrote {path}")
