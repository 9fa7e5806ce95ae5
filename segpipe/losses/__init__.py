"""Losses: a pure function and a thin ``nn.Module`` each, the loss spec, the schedules and the composite."""

from segpipe.losses.bitempered import BiTemperedLoss, bi_tempered_loss, tempered_softmax
from segpipe.losses.boundary import BoundaryLoss, boundary_loss
from segpipe.losses.composite import CompositeLoss, deep_supervision_weights
from segpipe.losses.cross_entropy import CrossEntropyLoss, cross_entropy_loss
from segpipe.losses.dice import DiceLoss, dice_loss
from segpipe.losses.focal import FocalLoss, focal_loss
from segpipe.losses.generalized_dice import GeneralizedDiceLoss, generalized_dice_loss
from segpipe.losses.schedule import SCHEDULES, Schedule, parse_schedule
from segpipe.losses.spec import TERMS, LossSpec, Term, parse_loss_spec

__all__ = [
    "SCHEDULES",
    "TERMS",
    "BiTemperedLoss",
    "BoundaryLoss",
    "CompositeLoss",
    "CrossEntropyLoss",
    "DiceLoss",
    "FocalLoss",
    "GeneralizedDiceLoss",
    "LossSpec",
    "Schedule",
    "Term",
    "bi_tempered_loss",
    "boundary_loss",
    "cross_entropy_loss",
    "deep_supervision_weights",
    "dice_loss",
    "focal_loss",
    "generalized_dice_loss",
    "parse_loss_spec",
    "parse_schedule",
    "tempered_softmax",
]
