"""Helpers shared by the benchmarks: timing, machine description, result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores ({cpu}), {gpu}, torch {torch.__version__}, Python {platform.python_version()}"


def timed(fn: Callable[[], Any], repeat: int = 3, warmup: int = 0) -> tuple[float, Any]:
    """Median wall time (s) of ``repeat`` calls after ``warmup`` calls; returns (seconds, last result)."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def save(name: str, result: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    result = {"benchmark": name, "machine": machine(), "date": time.strftime("%Y-%m-%d"), **result}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def have_compare(module: str) -> bool:
    """Whether ``module`` of nnU-Net is importable, for the benchmarks that run it as their baseline; says how
    to get it when not (the caller then skips)."""
    import importlib.util

    if importlib.util.find_spec(module) is not None:
        return True
    print(f"{module} is not installed: `pip install -e \".[compare]\"` (nnU-Net, with segpipe's torch) to compare with it; skipped")
    return False


def nnunet_paths(work: Path) -> None:
    """Point nnU-Net's raw, preprocessed and results folders into ``work`` (it reads them from the environment)."""
    os.environ["nnUNet_raw"] = str(work / "raw")
    os.environ["nnUNet_preprocessed"] = str(work / "nnunet_pre")
    os.environ["nnUNet_results"] = str(work / "nnunet_results")


def parameters(net: Any) -> int:
    """The number of parameters of a torch module."""
    return sum(p.numel() for p in net.parameters())


def link_nnunet_dataset(ds: Path, m: Any, cases: Sequence[tuple[str, Any]], channels: Sequence[str], labels: dict[str, int]) -> None:
    """A dataset in nnU-Net's raw format at ``ds`` whose files are links to the ``(new id, case)`` pairs of
    manifest ``m``: ``imagesTr/ID_XXXX.nii.gz`` per channel, ``labelsTr/ID.nii.gz`` and ``dataset.json``."""
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "labelsTr").mkdir()
    # the links keep their files' ending (readers tell gzip by the name): .nii.gz, or .nii (ISLES 2015/2018)
    ending = ".nii.gz" if str(m.label_path(cases[0][1])).endswith(".gz") else ".nii"
    for cid, case in cases:
        for i, ch in enumerate(channels):
            os.symlink(m.image_path(case, ch), ds / "imagesTr" / f"{cid}_{i:04d}{ending}")
        os.symlink(m.label_path(case), ds / "labelsTr" / f"{cid}{ending}")
    # nnU-Net picks each channel's normalisation by its name here: CT gets its CT scheme, the others z-score
    (ds / "dataset.json").write_text(json.dumps({"channel_names": {str(i): c.upper() for i, c in enumerate(channels)},
                                                 "labels": labels, "numTraining": len(cases), "file_ending": ending}))
