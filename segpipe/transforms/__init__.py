"""Transforms: signed distance maps, the preprocessing chain, augmentation.

The distance maps need NumPy and SciPy only; the chain's names are loaded on first use (PEP 562), so that
what reads a cache (``segpipe inspect``, the cache's key) does not import MONAI and PyTorch: 6 of the 7 s
``segpipe inspect`` took on the 2-core development machine.
"""

from typing import Any

from segpipe.transforms.distance import (
    SDM_VERSION,
    signed_distance_map,
    signed_distance_maps,
)

__all__ = ["SDM_VERSION", "SignedDistanced", "build_preprocessing", "signed_distance_map", "signed_distance_maps"]


def __getattr__(name: str) -> Any:
    if name in ("SignedDistanced", "build_preprocessing"):
        from segpipe.transforms import preprocessing

        return getattr(preprocessing, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
