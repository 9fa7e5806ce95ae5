"""``segpipe manifest`` and ``segpipe synth``: make a manifest of a dataset, write a synthetic one."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from cli._common import handle_errors, parse_ints, parse_names, parse_pairs

log = logging.getLogger("segpipe")


@handle_errors
def manifest(
    root: Annotated[Path, typer.Argument(help="Folder the dataset was unpacked into.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Manifest JSON file to write.", show_default=False)],
    layout: Annotated[
        str, typer.Option(help="Dataset layout: auto, isles22, isles15, isles18, wmh17 or nnunet (an nnU-Net raw dataset: "
                          "dataset.json, imagesTr, labelsTr). 'auto' detects it.")
    ] = "auto",
    channels: Annotated[
        str | None, typer.Option(help="Channels to use, in order, comma-separated (default: all of the layout's).")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Dataset name stored in the manifest (default: the layout).")] = None,
    folds: Annotated[int, typer.Option(help="Number of cross-validation folds.")] = 5,
    seed: Annotated[int, typer.Option(help="Seed of the fold split (stored in the manifest).")] = 0,
    splits: Annotated[Path | None, typer.Option(
        "--splits", help="nnU-Net's splits_final.json: take its folds (instead of --folds/--seed), so that segpipe's and "
        "nnU-Net's cross-validations hold out the same cases.", show_default=False)] = None,
    write_splits: Annotated[Path | None, typer.Option(
        "--write-splits", help="Also write the folds as nnU-Net's splits_final.json (to run nnU-Net on the same folds).",
        show_default=False)] = None,
    skip_incomplete: Annotated[bool, typer.Option("--skip-incomplete", help="Leave out cases that miss a channel instead of failing.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing manifest (its folds may change).")] = False,
) -> None:
    """Discover the cases of a dataset as distributed (ISLES 2015/2018/2022, WMH 2017, or nnU-Net's raw format) and write a manifest.

    The manifest lists each case's channel files and label, the label semantics, and seeded k-fold splits
    stored in the file so they never change.
    """
    from segpipe.data.layouts import discover
    from segpipe.data.manifest import write_manifest
    from segpipe.data.nnunet import read_splits, splits_json
    from segpipe.errors import SegpipeError
    from segpipe.io.atomic import atomic_write_text, ensure_writable_file

    ensure_writable_file(out, what="--out", example="manifest.json")
    if write_splits is not None:
        ensure_writable_file(write_splits, what="--write-splits", example="splits_final.json")
    if out.exists() and not overwrite:
        raise SegpipeError(f"--out '{out}': already exists; pass --overwrite to replace it (its folds may change)")
    m = discover(root, layout, parse_names(channels, "--channels"), name=name, folds=folds, seed=seed, skip_incomplete=skip_incomplete)
    if splits is not None:
        m = dataclasses.replace(m, folds=read_splits(splits, m))
    if write_splits is not None:
        if write_splits.exists() and not overwrite:
            raise SegpipeError(f"--write-splits '{write_splits}': already exists; pass --overwrite to replace it")
    write_manifest(m, out)
    if write_splits is not None:
        atomic_write_text(write_splits, json.dumps(splits_json(m), indent=2) + "\n")
    n_lab = len(m.labelled)
    typer.echo(
        f"wrote {out}: {len(m.cases)} cases ({n_lab} labelled), layout {m.layout}, channels {','.join(m.channels)}, "
        f"{len(m.folds)} folds"
    )


@handle_errors
def synth(
    root: Annotated[Path, typer.Argument(help="Folder to write the dataset into.", show_default=False)],
    layout: Annotated[str, typer.Option(help="Layout to write: isles22 (ISLES 2022 Zenodo), isles18 (ISLES 2018 CT perfusion) or wmh17 (WMH 2017).")] = "isles22",
    cases: Annotated[int, typer.Option(help="Number of cases.")] = 4,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed writes the same files.")] = 0,
    shape: Annotated[
        str | None,
        typer.Option(help="Label-grid size X,Y,Z (default 64,64,40 at 2 mm for isles22; 64,64,16 at 2x2x5 mm for isles18; "
                           "96,96,24 at 0.96x0.96x3 mm for wmh17)."),
    ] = None,
    fmt: Annotated[
        str, typer.Option("--format", help="nifti: the challenge's layout; dicom: one scanner-export study folder per case (labels as NIfTI); "
                     "dicom-enhanced: the same with one enhanced multi-frame file per series (not isles18).")
    ] = "nifti",
) -> None:
    """Write a synthetic dataset (head phantom with small, unbalanced lesions) in an official layout.

    Discovery, preprocessing, training and the demo run on it without any download.
    """
    from segpipe.data.synthetic import synthesize

    names = synthesize(root, layout, cases, seed, parse_ints(shape, "--shape", 3), fmt=fmt)
    typer.echo(f"wrote {len(names)} synthetic {layout} cases under {root}" + (" as DICOM exports" if fmt == "dicom" else ""))


@handle_errors
def convert(
    exports: Annotated[list[Path], typer.Argument(help="DICOM export folders (any tree of series; one case per study), or their ZIP archives.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="New folder for the dataset (nnU-Net raw format, e.g. Dataset501_Site).",
                                      show_default=False)],
    channels: Annotated[str, typer.Option(help="Channels, in the model's order, comma-separated (e.g. dwi,adc,flair); annotations "
                                          "must be drawn on the first one's series.", show_default=False)],
    classes: Annotated[str, typer.Option(help="Label names by segment number, background first.")] = "background,lesion",
    config: Annotated[Path | None, typer.Option("--config", "-c", help="A config (YAML file or built-in name) whose "
                                                "infer.dicom_rules choose the series (as for `segpipe infer`).")] = None,
    series: Annotated[list[str] | None, typer.Option("--series", help="CHANNEL=SERIESNUMBER: that channel's series in every study.")] = None,
    allow_uneven: Annotated[bool, typer.Option("--allow-uneven", help="Resample series with uneven slices instead of failing.")] = False,
    dicom_case: Annotated[str, typer.Option("--dicom-case", help="One case per study ('study'), or each EXPORT one case ('folder').")] = "study",
) -> None:
    """Turn DICOM exports and their DICOM SEG annotations into a dataset (nnU-Net's raw format) to train on.

    Each study's series are chosen per channel as `segpipe infer` chooses them; the SEG drawn on the first
    channel's series becomes its label (studies without one go to imagesTs). `segpipe manifest OUT` then
    discovers it, as nnU-Net does. A study that cannot be converted is named and left out (exit code 1).
    """
    from segpipe.config import load_config
    from segpipe.data.convert import convert_dicom
    from segpipe.errors import SegpipeError, UsageError

    if dicom_case not in ("study", "folder"):
        raise UsageError(f"--dicom-case: expected study or folder, got '{dicom_case}'")
    rules = load_config(config).infer.dicom_rules if config is not None else None
    report = convert_dicom(exports, out, parse_names(channels, "--channels") or (), classes=parse_names(classes, "--classes") or (),
                           rules=rules, series=parse_pairs(series, "--series", as_int=True), allow_uneven=allow_uneven,
                           by_study=dicom_case == "study")
    typer.echo(f"wrote {out}: {len(report.labelled)} annotated studies (imagesTr, labelsTr), {len(report.unlabelled)} without "
               f"annotation (imagesTs); next: segpipe manifest {out} --out data_manifests/{out.name}.json")
    if report.failed:
        raise SegpipeError(f"{len(report.failed)} stud{'y' if len(report.failed) == 1 else 'ies'} left out (listed above; also in "
                           f"{out / 'dataset.json'} under left_out)")
