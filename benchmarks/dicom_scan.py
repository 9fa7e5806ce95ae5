"""Finding the series of a DICOM export: seconds for a flat folder of many series.

Writes a synthetic export (``--series`` series of ``--files`` slices each, all in one folder, as PACS dumps
and many scanner exports store them) and times :func:`segpipe.io.dicom.find_series` (one pydicom pass over
the headers, grouped by SeriesInstanceUID) against the way it grouped them before, and as SimpleITK's own
examples do: GDCM's ``GetGDCMSeriesIDs`` for the folder, then ``GetGDCMSeriesFileNames`` for each series
(each call rescans the folder, so the cost grows with series x files). Both are also checked to find the
same series with the same files.

    python -m benchmarks.dicom_scan [--series 20] [--files 100] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np

from benchmarks._common import save, timed


def gdcm_per_series(root: Path) -> dict[str, list[str]]:
    """The baseline: GDCM's series, then each series' files from a rescan of its folder."""
    import SimpleITK as sitk

    reader, out = sitk.ImageSeriesReader(), {}
    for dirpath, _, files in os.walk(root):
        if files:
            for sid in reader.GetGDCMSeriesIDs(dirpath):
                out.setdefault(sid, []).extend(reader.GetGDCMSeriesFileNames(dirpath, sid))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", type=int, default=20)
    ap.add_argument("--files", type=int, default=100, help="slices per series")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    from pydicom.uid import generate_uid

    from segpipe.io.dicom import find_series, write_dicom_series

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "export"
        study, frame = generate_uid(), generate_uid()
        volume = np.random.default_rng(0).random((64, 64, args.files)).astype(np.float32)
        for s in range(args.series):
            write_dicom_series(volume, np.diag([2.0, 2.0, 2.0, 1.0]), root, description=f"series {s}", series_number=s + 1,
                               study_uid=study, frame_uid=frame, prefix=f"S{s:03d}_")
        ours_s, ours = timed(lambda: find_series(root), repeat=args.repeat, warmup=1)
        base_s, base = timed(lambda: gdcm_per_series(root), repeat=args.repeat, warmup=1)
    same = {s.uid: sorted(s.files) for s in ours} == {k: sorted(v) for k, v in base.items()}
    n = args.series * args.files
    ratio = base_s / ours_s
    print(f"find_series, {args.series} series x {args.files} files in one folder: {ours_s:.2f} s; GDCM per series: "
          f"{base_s:.2f} s; {ratio:.1f}x; same series and files: {same}")
    save("dicom_scan", {"series": args.series, "files_per_series": args.files, "files": n, "segpipe_seconds": round(ours_s, 3),
                        "gdcm_per_series_seconds": round(base_s, 3), "ratio": round(ratio, 2), "same_grouping": same})
    if not same:
        raise SystemExit("find_series and GDCM grouped the files differently")


if __name__ == "__main__":
    main()
