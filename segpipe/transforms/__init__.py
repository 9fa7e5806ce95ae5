"""Transforms: signed distance maps, the preprocessing chain, augmentation."""

from segpipe.transforms.distance import (
    SDM_VERSION,
    signed_distance_map,
    signed_distance_maps,
)
from segpipe.transforms.preprocessing import SignedDistanced, build_preprocessing

__all__ = ["SDM_VERSION", "SignedDistanced", "build_preprocessing", "signed_distance_map", "signed_distance_maps"]
