"""The registered architectures are exactly H0-mini and its teachers."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import timm
import torch
from timm.data import create_transform, resolve_data_config
from timm.layers import SwiGLUPacked

import h0mini  # noqa: F401
from h0mini import constants
from helpers import make_model


@pytest.fixture(scope="module")
def h0_mini_model():
    return make_model("h0_mini")


def test_h0_mini_has_the_published_parameter_count(h0_mini_model):
    assert sum(p.numel() for p in h0_mini_model.parameters()) == constants.NUM_PARAMS == 85_739_520
    assert h0_mini_model.num_prefix_tokens == constants.NUM_PREFIX_TOKENS == 5


def test_h0_mini_returns_cls_registers_and_256_patch_tokens(h0_mini_model):
    with torch.inference_mode():
        tokens = h0_mini_model(torch.randn(2, 3, 224, 224))
    assert tokens.shape == (2, 261, 768)


def test_h0_mini_equals_the_model_card_architecture_bit_for_bit(h0_mini_model):
    """Same state dict, same input: the timm base model with the reference arguments gives identical tokens."""
    reference = timm.create_model(
        "vit_base_patch14_reg4_dinov2",
        pretrained=False,
        img_size=224,
        mlp_ratio=5.33334,
        mlp_layer=SwiGLUPacked,
        act_layer=torch.nn.SiLU,
        num_classes=0,
        global_pool="",
        dynamic_img_size=True,
        init_values=1e-5,
    ).eval()
    reference.load_state_dict(h0_mini_model.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.equal(h0_mini_model(x), reference(x))


def test_teachers_have_the_published_parameter_count():
    # Built on the meta device: 1.1B parameters would cost 4.5 GB and many seconds for a count.
    with torch.device("meta"):
        for arch in ("h_optimus_0", "h_optimus_1"):
            model = timm.create_model(arch)
            assert sum(p.numel() for p in model.parameters()) == 1_134_774_272
            assert model.num_features == 1536 and model.num_prefix_tokens == 5


def test_pretrained_cfg_gives_the_model_card_preprocessing():
    model = timm.create_model("h0mini_test")
    config = resolve_data_config({}, model=model)
    assert config["mean"] == constants.MEAN and config["std"] == constants.STD
    assert config["input_size"] == (3, 224, 224)
    assert config["interpolation"] == "bicubic" and config["crop_pct"] == 1.0
    assert timm.create_model("h0_mini").pretrained_cfg["hf_hub_id"] == "bioptimus/H0-mini"
    transform = create_transform(**config)
    assert "Normalize" in repr(transform)


def test_dynamic_image_size_gives_the_matching_patch_grid():
    model = make_model()
    with torch.inference_mode():
        assert model(torch.randn(1, 3, 448, 448)).shape == (1, 5 + 32 * 32, 48)


def test_import_is_quiet_offline_and_light():
    """import h0mini: no output, no network, no CUDA, none of the optional extras."""
    code = textwrap.dedent(
        """
        import socket, sys
        def refuse(*args, **kwargs):
            raise AssertionError("network used at import")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        import h0mini, timm
        assert "h0_mini" in timm.list_models("h0*")
        heavy = [m for m in sys.modules if m.split(".")[0] in ("matplotlib", "sklearn", "pandas", "webdataset")
                 or m.startswith(("h0mini.distill", "h0mini.eval"))]
        assert not heavy, heavy
        import torch
        assert not torch.cuda.is_initialized()
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""
