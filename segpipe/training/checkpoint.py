"""Checkpoints: tensors and JSON-able metadata only, loadable with ``torch.load(weights_only=True)``.

A checkpoint holds the model and optimiser state, the grad-scaler state, the epoch, the loss schedule,
the resolved config and the plan (so ``segpipe infer`` needs nothing else), the RNG states, and the best
metric so far. It is written under a temporary name and renamed: a ``kill -9`` never leaves a damaged one.
"""

from __future__ import annotations

import hashlib
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segpipe.errors import SegpipeError
from segpipe.io.atomic import atomic_path

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_NAMES", "file_sha256", "load_checkpoint", "resolve_checkpoint", "rng_state", "run_subfolders", "save_checkpoint",
           "set_rng_state"]

CHECKPOINT_FORMAT = "segpipe-checkpoint-v1"


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file (hex): which model made a result, in the result's own records (a checkpoint's path
    says nothing once it is copied into a container or renamed)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def rng_state() -> dict[str, Any]:
    """Every RNG the training touches, as tensors and JSON-able values."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save({"format": CHECKPOINT_FORMAT, **payload}, tmp)
    return path


#: what a run folder holds, in the order a model is taken from it
CHECKPOINT_NAMES = ("checkpoint_best.pt", "checkpoint_latest.pt")


def run_subfolders(folder: Path) -> list[Path]:
    """The subfolders of ``folder`` that hold a checkpoint (runs), sorted."""
    return sorted(d for d in folder.iterdir() if d.is_dir() and any((d / n).is_file() for n in CHECKPOINT_NAMES))


def resolve_checkpoint(model: str | Path, option: str = "--model") -> Path:
    """A run folder (its ``checkpoint_best.pt``, else ``checkpoint_latest.pt``) or a checkpoint file; ``option``
    names the command-line option in the errors."""
    p = Path(model)
    if p.is_dir():
        for name in CHECKPOINT_NAMES:
            if (p / name).is_file():
                return p / name
        runs = [d.name for d in run_subfolders(p)]
        which = "give each with its own --model (an ensemble), or one of them" if option == "--model" else "give one of them"
        hint = f"; it holds the runs {', '.join(runs)}: {which}" if runs else "; give a run folder of `segpipe train`"
        raise SegpipeError(f"{option} '{p}': no checkpoint_best.pt or checkpoint_latest.pt in this folder{hint}")
    if not p.exists():
        raise SegpipeError(f"{option} '{p}': not found; give a run folder or a checkpoint file")
    return p


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", *, mmap: bool = False) -> dict[str, Any]:
    """Load a segpipe checkpoint safely (``weights_only=True``: no pickled code is ever run). ``mmap``: the
    tensors are mapped, not read (for a look at the metadata only)."""
    path = Path(path)
    if not path.is_file():
        raise SegpipeError(f"checkpoint '{path}': file not found; give a run folder or a checkpoint_*.pt file")
    if not zipfile.is_zipfile(path):  # every torch.save since PyTorch 1.6 writes a zip archive
        raise SegpipeError(f"checkpoint '{path}': not a readable PyTorch checkpoint (not a torch.save archive); give a segpipe checkpoint")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise SegpipeError(
            f"checkpoint '{path}': refused, loading it would run pickled code ({str(exc).splitlines()[0][:120]}); "
            "only segpipe checkpoints (tensors and plain metadata) are loaded"
        ) from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise SegpipeError(f"checkpoint '{path}': not a readable PyTorch checkpoint ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise SegpipeError(f"checkpoint '{path}': not a segpipe checkpoint (no '{CHECKPOINT_FORMAT}' marker); train one with `segpipe train`")
    return ckpt
