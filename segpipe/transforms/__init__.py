"""Transforms: signed distance maps, the preprocessing chain, augmentation."""

from segpipe.transforms.distance import (
    SDM_VERSION,
    signed_distance_map,
    signed_distance_maps,
)

__all__ = ["SDM_VERSION", "signed_distance_map", "signed_distance_maps"]
