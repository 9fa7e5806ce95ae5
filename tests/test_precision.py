"""Mixed precision per GPU generation: bfloat16 where the GPU computes in it, float16 where it only emulates it.

No GPU here: the device's properties are what PyTorch would report for the named GPUs (compute capability),
given through ``torch.cuda.get_device_properties``."""

import logging
from types import SimpleNamespace

import pytest
import torch

from segpipe.config import load_config
from segpipe.inference.predictor import Predictor
from segpipe.precision import autocast_dtype, native_bfloat16, training_precision

GPUS = {"Tesla V100-SXM2-32GB": (7, 0), "Tesla T4": (7, 5), "NVIDIA A100-SXM4-80GB": (8, 0), "NVIDIA H200": (9, 0)}
CUDA = torch.device("cuda", 0)


@pytest.fixture
def gpu(monkeypatch):
    """Pretend the CUDA device is the named GPU."""

    def use(name: str) -> None:
        major, minor = GPUS[name]
        monkeypatch.setattr(torch.version, "hip", None)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(name=name, major=major, minor=minor))

    return use


@pytest.mark.parametrize("name, expected", [("Tesla V100-SXM2-32GB", torch.float16), ("Tesla T4", torch.float16),
                                            ("NVIDIA A100-SXM4-80GB", torch.bfloat16), ("NVIDIA H200", torch.bfloat16)])
def test_auto_takes_bfloat16_only_where_native(gpu, name, expected):
    gpu(name)
    assert native_bfloat16(CUDA) == (expected == torch.bfloat16)
    assert autocast_dtype(CUDA) == expected
    assert autocast_dtype(CUDA, "auto") == expected


def test_explicit_choice_and_cpu(gpu):
    gpu("Tesla T4")
    assert autocast_dtype(CUDA, "bfloat16") == torch.bfloat16  # asked for: given, with a warning in training
    assert autocast_dtype(CUDA, "float16") == torch.float16
    assert autocast_dtype(torch.device("cpu"), "bfloat16") is None  # float32 on the CPU
    with pytest.raises(ValueError, match="auto, bfloat16 or float16"):
        autocast_dtype(CUDA, "fp8")


def test_rocm_counts_as_native(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert autocast_dtype(CUDA) == torch.bfloat16


def test_config_default_is_auto():
    assert load_config(None, []).train.amp_dtype == "auto"
    assert load_config(None, ["train.amp_dtype=float16"]).train.amp_dtype == "float16"


@pytest.mark.filterwarnings("ignore:torch.cuda.amp.GradScaler is enabled, but CUDA is not available")  # no GPU here
def test_training_precision_says_what_and_why(gpu, caplog):
    caplog.set_level(logging.INFO, logger="segpipe")
    gpu("Tesla T4")
    dtype, _ = training_precision(CUDA, True, "auto")
    assert dtype == torch.float16
    assert "float16 (Tesla T4 (compute capability 7.5) has no native bfloat16); gradients scaled" in caplog.text
    caplog.clear()
    dtype, _ = training_precision(CUDA, True, "bfloat16")
    assert dtype == torch.bfloat16
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warned and "train.amp_dtype=auto or float16" in warned[0].getMessage()
    caplog.clear()
    gpu("NVIDIA H200")
    dtype, scaler = training_precision(CUDA, True, "auto")
    assert dtype == torch.bfloat16 and not scaler.is_enabled()
    assert "bfloat16 on NVIDIA H200" in caplog.text and "scaled" not in caplog.text
    assert training_precision(CUDA, False, "auto")[0] is None  # --no-amp


def test_predictor_follows_the_gpu(gpu):
    """The predictor computed in bfloat16 on every GPU, a T4's convolutions included."""
    from segpipe.models import build_network
    from segpipe.planning import make_plan

    cfg = load_config(None, ["plan.patch_size=[16,16,16]", "plan.max_stages=3"])
    plan = make_plan(cfg, ("a",), ("background", "lesion"), None, 0.5, [(1, 1, 1)], [(32, 32, 32)])
    net = build_network(plan)
    gpu("Tesla T4")
    assert Predictor(net, plan, device=CUDA).amp_dtype == torch.float16
    gpu("NVIDIA H200")
    assert Predictor(net, plan, device=CUDA).amp_dtype == torch.bfloat16
    assert Predictor(net, plan, device=CUDA, amp=False).amp_dtype is None
    assert Predictor(net, plan, device=torch.device("cpu")).amp_dtype is None
