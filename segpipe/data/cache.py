"""The preprocessed case cache.

Layout::

    CACHE/
      plan.json           the plan every case was made with
      fingerprint.json    per-case spacing, shape, intensity and lesion statistics
      cache.json          index: cases, folds (copied from the manifest), label semantics
      cases/<id>/         one folder per case, written whole under a temporary name, then renamed
        image.npy         (C, X, Y, Z) float32
        label.npy         (X, Y, Z) uint8, 255 = ignore
        sdm.npy           (K-1, X, Y, Z) float32, mm
        fg.npy            (N, 4) int32: class, x, y, z of up to 10,000 voxels per foreground class
        meta.json         key, geometry, statistics

A case's ``key`` hashes everything that shaped it: the plan's preprocessing settings, the signed-distance
code version, the preprocessing code version and each input file's size and modification time. An entry
whose key differs is stale and is made again; nothing else is ever reused. Arrays are plain ``.npy`` files,
opened as read-only memory maps, so the training loader cuts patches without reading whole volumes and
several loader processes share the page cache instead of holding copies.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segpipe.errors import SegpipeError
from segpipe.io.atomic import TMP_PREFIX, atomic_path, atomic_write_text
from segpipe.io.nifti import bval_sidecar
from segpipe.transforms.distance import SDM_VERSION

__all__ = ["PREPROCESS_VERSION", "CachedCase", "CaseCache", "case_key", "has_foreground"]

# bump whenever the preprocessing chain's output changes for the same settings
PREPROCESS_VERSION = 1
MAX_FG_LOCATIONS = 10_000


def case_key(preprocessing: dict[str, Any], files: dict[str, Path]) -> str:
    """Hash of the settings and the identity (size, modification time) of the input files."""
    ident = {}
    for role, path in sorted(files.items()):
        try:
            st = Path(path).stat()
            ident[role] = [str(path), st.st_size, st.st_mtime_ns]
            side = bval_sidecar(Path(path))  # a 4D diffusion file is read through its b-values
            if side is not None:
                ident[role].append([side.stat().st_size, side.stat().st_mtime_ns])
        except OSError:
            ident[role] = [str(path), None, None]
    payload = {"preprocessing": preprocessing, "sdm_version": SDM_VERSION, "code_version": PREPROCESS_VERSION, "files": ident}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


@dataclass
class CachedCase:
    id: str
    image: np.ndarray  # (C, X, Y, Z), memory-mapped
    label: np.ndarray | None
    sdm: np.ndarray | None
    fg: np.ndarray  # (N, 4)
    meta: dict[str, Any]

    @property
    def affine(self) -> np.ndarray:
        return np.asarray(self.meta["affine"], dtype=np.float64)

    @property
    def spacing(self) -> tuple[float, ...]:
        return tuple(self.meta["spacing"])


class CaseCache:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.cases_dir = self.root / "cases"

    # -- index files -----------------------------------------------------------------------------------
    @property
    def plan_path(self) -> Path:
        return self.root / "plan.json"

    def read_json(self, name: str) -> dict[str, Any]:
        path = self.root / name
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SegpipeError(
                f"cache '{self.root}': no {name}; run `segpipe preprocess --manifest M --config C --out {self.root}` first"
            ) from None
        except json.JSONDecodeError as exc:
            raise SegpipeError(f"cache '{self.root}': {name} is damaged ({exc.msg}); run `segpipe preprocess` again") from None

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        atomic_write_text(self.root / name, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")

    # -- entries ---------------------------------------------------------------------------------------
    def entry(self, case_id: str) -> Path:
        return self.cases_dir / case_id

    def meta(self, case_id: str) -> dict[str, Any] | None:
        """The entry's meta data, or None when it is missing or incomplete."""
        path = self.entry(case_id) / "meta.json"
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None

    def is_fresh(self, case_id: str, key: str) -> bool:
        meta = self.meta(case_id)
        return bool(meta and meta.get("key") == key and (self.entry(case_id) / "image.npy").is_file())

    def clean_temporary(self) -> int:
        """Remove what an interrupted run left (temporary folders); returns how many."""
        if not self.cases_dir.is_dir():
            return 0
        n = 0
        for p in self.cases_dir.iterdir():
            if not p.name.startswith(TMP_PREFIX):
                continue
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            n += 1
        return n

    def write(self, case_id: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
        """Write an entry atomically: all files appear together, or none."""
        final = self.entry(case_id)
        with atomic_path(final, directory=True) as tmp:
            for name, arr in arrays.items():
                np.save(tmp / f"{name}.npy", np.ascontiguousarray(arr), allow_pickle=False)
            # meta.json last: an entry is complete when it has one
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=_json_default), encoding="utf-8")
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        return final

    def load(self, case_id: str, *, mmap: bool = True) -> CachedCase:
        meta = self.meta(case_id)
        folder = self.entry(case_id)
        if meta is None:
            raise SegpipeError(f"cache '{self.root}': case '{case_id}' is missing or incomplete; run `segpipe preprocess` again")
        mode = "r" if mmap else None

        def arr(name: str) -> np.ndarray | None:
            path = folder / f"{name}.npy"
            if not path.is_file():
                return None
            try:
                return np.load(path, mmap_mode=mode, allow_pickle=False)
            except (ValueError, OSError) as exc:
                raise SegpipeError(f"cache '{self.root}': {path.name} of case '{case_id}' is damaged ({exc}); run `segpipe preprocess` again") from None

        image = arr("image")
        if image is None:
            raise SegpipeError(f"cache '{self.root}': case '{case_id}' has no image.npy; run `segpipe preprocess` again")
        fg = arr("fg")
        return CachedCase(case_id, image, arr("label"), arr("sdm"), np.zeros((0, 4), np.int32) if fg is None else np.asarray(fg), meta)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-able: {type(o).__name__}")


def has_foreground(meta: dict[str, Any] | None) -> bool:
    """Whether a cached case's label holds any foreground voxel (from its meta data's label statistics; a case
    without them counts as having some: nothing is known against it)."""
    fractions = ((meta or {}).get("stats", {}).get("label", {}) or {}).get("fractions")
    return not fractions or any(f > 0 for f in fractions[1:])


def foreground_locations(label: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``MAX_FG_LOCATIONS`` voxel coordinates per foreground class, as rows ``(class, x, y, z)``."""
    rows = []
    for k in range(1, num_classes):
        coords = np.argwhere(label == k)
        if len(coords) > MAX_FG_LOCATIONS:
            coords = coords[rng.choice(len(coords), MAX_FG_LOCATIONS, replace=False)]
        if len(coords):
            rows.append(np.concatenate([np.full((len(coords), 1), k), coords], axis=1))
    return np.concatenate(rows).astype(np.int32) if rows else np.zeros((0, 1 + label.ndim), np.int32)
