"""Planning: target spacing rule, topology for isotropic and thick-slice data, patch/batch budget, overrides."""

from __future__ import annotations

import numpy as np
import pytest

from segpipe.config import Config, load_config
from segpipe.errors import UsageError
from segpipe.planning import (
    Plan,
    estimate_memory_gb,
    make_plan,
    plan_topology,
    target_spacing_from,
)


def test_target_spacing_median_when_isotropic():
    assert target_spacing_from([(1, 1, 1), (1.2, 1.2, 1.2), (0.9, 0.9, 0.9)], [(100, 100, 100)] * 3) == (1.0, 1.0, 1.0)


def test_target_spacing_anisotropic_rule():
    spacings = [(0.9, 0.9, 5.0)] * 5 + [(0.9, 0.9, 3.0)] * 3 + [(0.9, 0.9, 6.0)] * 2
    shapes = [(256, 256, 30)] * 10
    t = target_spacing_from(spacings, shapes)
    assert t[:2] == (0.9, 0.9)
    assert t[2] == pytest.approx(np.percentile([s[2] for s in spacings], 10))  # not the median 5.0
    # anisotropic spacing but many slices: the median stays
    assert target_spacing_from(spacings, [(256, 256, 200)] * 10)[2] == 5.0


def test_topology_isotropic():
    net = plan_topology((1, 1, 1), (128, 128, 128))
    assert net.strides[0] == (1, 1, 1) and all(s == (2, 2, 2) for s in net.strides[1:])
    assert all(k == (3, 3, 3) for k in net.kernel_sizes)
    assert len(net.strides) == 6 and net.divisor == (32, 32, 32)
    assert net.filters == (32, 64, 128, 256, 320, 320)


def test_topology_thick_slices_waits_before_pooling_z():
    net = plan_topology((0.9, 0.9, 5.0), (224, 224, 24))
    assert net.kernel_sizes[0] == (3, 3, 1)  # no context across 5 mm slices at full resolution
    assert net.strides[1] == (2, 2, 1) and net.strides[2] == (2, 2, 1)
    assert any(s[2] == 2 for s in net.strides[3:])  # z is pooled once in-plane has caught up
    first_z = next(i for i, s in enumerate(net.strides) if s[2] == 2)
    assert net.kernel_sizes[first_z - 1][2] == 3 or net.kernel_sizes[first_z][2] == 3


def test_plan_fits_the_memory_budget_and_patch_is_divisible():
    cfg = load_config(None, ["plan.gpu_memory_gb=4"])
    plan = make_plan(cfg, ("t1", "flair"), ("bg", "les"), None, 0.5, [(1, 1, 1)] * 4, [(180, 200, 170)] * 4)
    assert estimate_memory_gb(plan.patch_size, plan.network, plan.batch_size, 2) <= 4.0
    assert all(p % d == 0 for p, d in zip(plan.patch_size, plan.network.divisor))
    big = make_plan(load_config(None, ["plan.gpu_memory_gb=40"]), ("t1",), ("bg", "les"), None, 0.5, [(1, 1, 1)] * 4, [(180, 200, 170)] * 4)
    assert np.prod(big.patch_size) * big.batch_size > np.prod(plan.patch_size) * plan.batch_size


def test_overrides_from_config_and_json_round_trip():
    cfg = load_config(None, ["plan.patch_size=[32,32,16]", "plan.batch_size=3", "preprocess.target_spacing=[1,1,2]", "plan.base_features=8"])
    plan = make_plan(cfg, ("a",), ("bg", "x"), None, 0.5, [(1, 1, 1)], [(64, 64, 64)])
    assert plan.patch_size == (32, 32, 16) and plan.batch_size == 3 and plan.target_spacing == (1.0, 1.0, 2.0)
    assert plan.network.filters[0] == 8
    assert Plan.from_json(plan.to_json()) == plan


def test_patch_not_divisible_is_refused():
    cfg = load_config(None, ["plan.patch_size=[30,32,32]"])
    with pytest.raises(UsageError, match=r"must be a multiple of"):
        make_plan(cfg, ("a",), ("bg", "x"), None, 0.5, [(1, 1, 1)], [(64, 64, 64)])


def test_reference_channel_must_exist():
    with pytest.raises(UsageError, match="data.reference_channel"):
        make_plan(load_config(None, ["data.reference_channel=dwi"]), ("t1",), ("bg", "x"), None, 0.5, [(1, 1, 1)], [(64, 64, 64)])


def test_default_config_is_valid():
    assert Config().plan.gpu_memory_gb > 0


def test_residual_encoder_blocks_memory_and_round_trip():
    shapes, spacings = [(180, 200, 170)] * 4, [(1, 1, 1)] * 4
    plain = make_plan(load_config(None, []), ("t1",), ("bg", "les"), None, 0.5, spacings, shapes)
    res = make_plan(load_config(None, ["plan.architecture=resenc"]), ("t1",), ("bg", "les"), None, 0.5, spacings, shapes)
    assert plain.network.encoder_blocks == ()
    stages = len(res.network.strides)
    assert res.network.encoder_blocks == (1, 3, 4, 6, 6, 6, 6)[:stages]  # nnU-Net's ResEnc, the last value repeated
    # more activations per voxel: the same budget gives a smaller patch (or batch)
    assert estimate_memory_gb(res.patch_size, res.network, res.batch_size, 1) <= 10.0
    assert np.prod(res.patch_size) * res.batch_size < np.prod(plain.patch_size) * plain.batch_size
    assert estimate_memory_gb(plain.patch_size, res.network, plain.batch_size, 1) > estimate_memory_gb(
        plain.patch_size, plain.network, plain.batch_size, 1)
    assert Plan.from_json(res.to_json()) == res
    # plans written before the residual encoder existed read as plain
    old = plain.to_json()
    del old["network"]["encoder_blocks"]
    assert Plan.from_json(old) == plain
    topo = make_plan(load_config(None, ["plan.architecture=resenc", "plan.kernel_sizes=[[3,3,3],[3,3,3],[3,3,3]]",
                                        "plan.strides=[[1,1,1],[2,2,2],[2,2,2]]", "plan.patch_size=[32,32,32]"]),
                     ("t1",), ("bg", "les"), None, 0.5, spacings, shapes)
    assert topo.network.encoder_blocks == (1, 3, 4)


def test_residual_encoder_network():
    import torch
    from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetResBlock

    from segpipe.models import build_network

    cfg = ["plan.patch_size=[32,32,32]", "plan.base_features=4", "plan.max_features=16"]
    plans = {a: make_plan(load_config(None, [*cfg, f"plan.architecture={a}"]), ("a", "b"), ("bg", "x"), None, 0.5,
                          [(1, 1, 1)], [(64, 64, 64)]) for a in ("plain", "resenc")}
    nets = {a: build_network(p) for a, p in plans.items()}
    blocks = plans["resenc"].network.encoder_blocks
    assert sum(isinstance(m, UnetResBlock) for m in nets["resenc"].modules()) == sum(blocks)
    assert not any(isinstance(m, UnetResBlock) for m in nets["plain"].modules())
    # the decoder: one convolution per stage (nnU-Net's ResEnc), two in the plain network
    assert not any(isinstance(m, UnetBasicBlock) for m in nets["resenc"].modules())
    assert all(isinstance(up.conv_block, UnetBasicBlock) for up in nets["plain"].upsamples)
    convs = {a: sum(isinstance(m, torch.nn.Conv3d) for m in net.upsamples.modules()) for a, net in nets.items()}
    assert convs["plain"] - convs["resenc"] == len(nets["plain"].upsamples)
    x = torch.randn(1, 2, 32, 32, 32)
    for a, net in nets.items():
        net.train()
        heads = net(x)
        assert [tuple(h.shape) for h in heads] == [(1, 2, 32, 32, 32), (1, 2, 16, 16, 16), (1, 2, 8, 8, 8)][: len(heads)], a
        net.eval()
        assert net(x).shape == (1, 2, 32, 32, 32)
    # every block learns: a step changes the weights of the last residual block of the deepest encoder stage
    net = nets["resenc"]
    net.train()
    deepest = net.bottleneck[-1]
    before = deepest.conv2.conv.weight.detach().clone()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sum(h.mean() for h in net(x)).backward()
    opt.step()
    assert not torch.equal(before, deepest.conv2.conv.weight)


@pytest.mark.parametrize("spacing, patch", [
    ((1, 1, 1), (128, 128, 128)), ((2, 2, 2), (64, 64, 40)), ((0.9, 0.9, 5.0), (224, 224, 24)),
    ((0.96, 0.96, 3.0), (192, 192, 48)), ((1, 1, 3), (160, 160, 32)), ((0.45, 0.45, 5.0), (320, 320, 16)),
    ((2, 2, 2), (112, 112, 80)), ((1.2, 1.2, 1.0), (96, 128, 160)), ((0.8, 1.0, 1.6), (160, 128, 80)),
])
def test_topology_equals_nnunets(spacing, patch, nnunet):
    """Kernels and strides as nnU-Net's own planner makes them (skipped without nnU-Net: the 'compare' extra).
    nnU-Net adds stages as long as the feature map allows; segpipe stops at plan.max_stages (6 by default)."""
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    _, pools, convs, _, _ = get_pool_and_conv_props(list(spacing), list(patch), 4, 999999)
    theirs = ([tuple(int(v) for v in p) for p in pools], [tuple(int(v) for v in c) for c in convs])
    ours = plan_topology(spacing, patch, max_stages=len(pools))
    assert (list(ours.strides), list(ours.kernel_sizes)) == theirs
    default = plan_topology(spacing, patch)
    assert list(default.strides) == theirs[0][: len(default.strides)]


def test_target_spacing_equals_nnunets(nnunet):
    """The target spacing as nnU-Net's planner chooses it, on random fingerprints with and without thick slices
    (skipped without nnU-Net: the 'compare' extra)."""
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    rng = np.random.default_rng(0)
    aniso_seen = 0
    for trial in range(40):
        n = int(rng.integers(3, 30))
        thick = trial % 2 == 0
        spacings = np.column_stack([rng.uniform(0.4, 1.2, n), rng.uniform(0.4, 1.2, n),
                                    rng.uniform(3.0, 7.0, n) if thick else rng.uniform(0.8, 1.6, n)])
        shapes = np.column_stack([rng.integers(180, 520, n), rng.integers(180, 520, n),
                                  rng.integers(16, 60, n) if thick else rng.integers(120, 200, n)])
        planner = ExperimentPlanner.__new__(ExperimentPlanner)  # the method needs only these attributes
        planner.overwrite_target_spacing, planner.anisotropy_threshold = None, 3
        planner.dataset_fingerprint = {"spacings": [list(s) for s in spacings], "shapes_after_crop": [list(s) for s in shapes]}
        theirs = planner.determine_fullres_target_spacing()
        ours = target_spacing_from(spacings.tolist(), shapes.tolist())
        np.testing.assert_allclose(ours, theirs, atol=2e-6)
        aniso_seen += bool(abs(theirs[2] - np.median(spacings[:, 2])) > 1e-6)
    assert aniso_seen >= 5  # the thick-slice rule was exercised
