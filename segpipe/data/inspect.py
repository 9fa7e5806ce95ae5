"""``segpipe inspect``: what is in a cache, and one case as NIfTI files or a PNG panel."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from segpipe.data.cache import CaseCache
from segpipe.errors import SegpipeError, did_you_mean
from segpipe.io.atomic import atomic_path, ensure_writable_dir
from segpipe.io.nifti import save_nifti
from segpipe.planning import describe_normalization

__all__ = ["case_summary", "export_case_nifti", "render_case_png", "summarize_cache", "summarize_dicom"]


def _index(cache: CaseCache) -> dict:
    return cache.read_json("cache.json")


def _check_case(cache: CaseCache, case_id: str) -> None:
    cases = _index(cache)["cases"]
    if case_id not in cases:
        raise SegpipeError(
            f"cache '{cache.root}': no case '{case_id}'{did_you_mean(case_id, cases)}; it has {len(cases)}: "
            f"{', '.join(cases[:8])}{' ...' if len(cases) > 8 else ''}"
        )


def summarize_cache(root: str | os.PathLike) -> str:
    cache = CaseCache(root)
    index = _index(cache)
    plan = cache.read_json("plan.json")
    lines = [
        f"cache {cache.root}: {len(index['cases'])} cases of '{index.get('name')}', channels {', '.join(index['channels'])}, "
        f"classes {', '.join(index['classes'])}",
        f"target spacing {'x'.join(f'{v:g}' for v in plan['target_spacing'])} mm, patch {'x'.join(map(str, plan['patch_size']))}, "
        f"batch {plan['batch_size']}, {len(index['folds'])} folds",
        describe_normalization(plan),
        "",
        f"{'case':<28} {'shape':<16} {'spacing (mm)':<16} {'lesion %':>9} {'lesions':>8} {'ml':>8}",
    ]
    for cid in index["cases"]:
        meta = cache.meta(cid)
        if meta is None:
            lines.append(f"{cid:<28} (missing: run `segpipe preprocess` again)")
            continue
        lab = meta["stats"]["label"]
        frac = 100 * sum(lab["fractions"][1:])
        lesions = sum(c["lesions"] for c in lab["classes"])
        ml = sum(c["volume_ml"] for c in lab["classes"])
        shape = "x".join(map(str, meta["shape"]))
        spacing = "x".join(f"{v:.3g}" for v in meta["spacing"])
        lines.append(f"{cid:<28} {shape:<16} {spacing:<16} {frac:>9.3f} {lesions:>8d} {ml:>8.2f}")
    if index.get("failed"):
        lines.append("")
        lines += [f"failed: {cid}: {msg}" for cid, msg in index["failed"].items()]
    return "\n".join(lines)


def summarize_dicom(root: str | os.PathLike, channels: tuple[str, ...] | None = None, name: str | None = None) -> str:
    """The image series of a DICOM export, per study, and the series the built-in rules would choose for each
    channel (default: every channel they know): what to check, and what to give ``segpipe infer --series``,
    before running a model on it. ``name``: what to call the export (a ZIP archive unpacked into ``root``)."""
    import logging

    from segpipe.io.dicom import DEFAULT_RULES, format_series_table, scan_export, select_series

    channels = tuple(DEFAULT_RULES) if channels is None else channels

    root = Path(root)
    name = name or str(root)
    series, segs = scan_export(root)
    if not series:
        raise SegpipeError(f"'{name}': no DICOM image series found; point at the folder the scanner export was unpacked into")
    studies: dict[tuple[str, str], list] = {}
    for s in series:
        studies.setdefault((s.study_uid, s.patient), []).append(s)
    lines = [f"DICOM export {name}: {len(series)} image series in {len(studies)} {'study' if len(studies) == 1 else 'studies'}"]
    quiet = logging.getLogger("segpipe.io.dicom")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # select_series tells what it chose at INFO: said below, once
    try:
        for (uid, patient), group in studies.items():
            lines += ["", f"study {group[0].study or uid} (patient {patient or 'unknown'}):"]
            lines += [f"  {line}" for line in format_series_table(group)]
            picks = []
            for ch in channels:
                try:
                    picked, _ = select_series(group, [ch], where=name)[ch]
                    picks.append(f"{ch} <- #{picked.number}")
                except SegpipeError as exc:
                    if "candidate" in str(exc):
                        picks.append(f"{ch}: {len(exc.details)} candidates")
            lines.append(f"  the built-in rules would choose: {', '.join(picks) if picks else 'nothing'}")
            numbers = {g.uid: g.number for g in group}
            for seg in (s for s in segs if s.study_uid == uid):  # annotations, for `segpipe convert` (or a SEG of ours)
                on = [f"#{numbers[r]}" for r in seg.referenced_series if r in numbers] or ["a series not in this export"]
                lines.append(f"  DICOM SEG {seg.path.relative_to(root) if seg.path.is_relative_to(root) else seg.path} "
                             f"drawn on {', '.join(on)}")
    finally:
        quiet.setLevel(level)
    lines.append("choose others with `segpipe infer ... --series CHANNEL=NUMBER`, or rules in a config's infer.dicom_rules")
    return "\n".join(lines)


def case_summary(root: str | os.PathLike, case_id: str) -> str:
    cache = CaseCache(root)
    _check_case(cache, case_id)
    c = cache.load(case_id)
    lab = c.meta["stats"]["label"]
    lines = [f"case {case_id}: image {tuple(c.image.shape)} float32, spacing {tuple(round(v, 4) for v in c.spacing)} mm"]
    for name, st in c.meta["stats"]["intensity"].items():
        lines.append(f"  {name}: raw mean {st['mean']:.4g}, std {st['std']:.4g}, median {st['median']:.4g} (head voxels)")
    for k, info in enumerate(lab["classes"], start=1):
        sizes = ", ".join(f"{s:g}" for s in info["sizes_mm3"][:8])
        lines.append(f"  class {k}: {info['lesions']} lesions, {info['volume_ml']:.3f} ml; largest (mm3): {sizes}")
    if c.sdm is not None and c.sdm.size:
        lines.append(f"  distance maps: {tuple(c.sdm.shape)}, range {float(c.sdm.min()):.1f} .. {float(c.sdm.max()):.1f} mm")
    return "\n".join(lines)


def export_case_nifti(root: str | os.PathLike, case_id: str, out: str | os.PathLike) -> list[Path]:
    """Write the case's arrays with the preprocessed affine: image_<channel>, label, sdm_<class>."""
    cache = CaseCache(root)
    _check_case(cache, case_id)
    c = cache.load(case_id)
    out = ensure_writable_dir(out, what="--export-nifti folder")
    classes = _index(cache)["classes"]
    written = []
    for i, ch in enumerate(c.meta["channels"]):
        written.append(save_nifti(out / f"image_{ch}.nii.gz", np.asarray(c.image[i]), c.affine))
    if c.label is not None:
        written.append(save_nifti(out / "label.nii.gz", np.asarray(c.label), c.affine))
    if c.sdm is not None:
        for k in range(c.sdm.shape[0]):
            written.append(save_nifti(out / f"sdm_{classes[k + 1]}.nii.gz", np.asarray(c.sdm[k]), c.affine))
    return written


def render_case_png(root: str | os.PathLike, case_id: str, out: str | os.PathLike) -> Path:
    """A panel through the axial slice with the most lesion: each channel, the label, each distance map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cache = CaseCache(root)
    _check_case(cache, case_id)
    c = cache.load(case_id)
    label = np.asarray(c.label) if c.label is not None else np.zeros(c.image.shape[1:], np.uint8)
    fg = (label > 0) & (label != 255)
    z = int(np.argmax(fg.sum(axis=(0, 1)))) if fg.any() else c.image.shape[-1] // 2
    channels = c.meta["channels"]
    n_sdm = 0 if c.sdm is None else c.sdm.shape[0]
    cols = len(channels) + 1 + n_sdm
    fig, axes = plt.subplots(1, cols, figsize=(3.2 * cols, 3.6), squeeze=False)
    axes = axes[0]
    for i, ch in enumerate(channels):
        axes[i].imshow(np.asarray(c.image[i, :, :, z]).T, cmap="gray", origin="lower")
        axes[i].set_title(ch)
    show = np.ma.masked_where(label[:, :, z] == 0, label[:, :, z])
    axes[len(channels)].imshow(np.asarray(c.image[0, :, :, z]).T, cmap="gray", origin="lower")
    axes[len(channels)].imshow(show.T, cmap="autumn", origin="lower", alpha=0.7, interpolation="nearest")
    axes[len(channels)].set_title("label")
    for k in range(n_sdm):
        d = np.asarray(c.sdm[k, :, :, z])
        lim = max(float(np.abs(d).max()), 1e-6)
        im = axes[len(channels) + 1 + k].imshow(d.T, cmap="RdBu_r", vmin=-lim, vmax=lim, origin="lower")
        axes[len(channels) + 1 + k].contour(fg[:, :, z].T.astype(float), levels=[0.5], colors="k", linewidths=0.6)
        axes[len(channels) + 1 + k].set_title(f"distance map {k + 1} (mm)")
        fig.colorbar(im, ax=axes[len(channels) + 1 + k], fraction=0.046)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(f"{case_id}, axial slice {z} (RAS, preprocessed)")
    fig.tight_layout()
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return out
