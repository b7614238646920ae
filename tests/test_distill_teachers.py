"""Teachers other than a ViT folder: timm CNNs by name, folder or local weights file, and plain nn.Modules."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import save_file

from h0mini.distill.__main__ import main
from h0mini.distill.config import ConfigError, load_config
from h0mini.distill.teachers import FeatureMapTeacher, as_token_teacher, build_teacher
from h0mini.distill.train import train

from helpers import slide_tiles

from PIL import Image

TINY = [
    "student.arch=h0mini_test", "student.model_args={embed_dim: 24, depth: 1, num_heads: 2}", "data.num_workers=0",
    "crops.global_size=56", "crops.local_size=28", "crops.n_local=2", "feature.projector_hidden_dim=0",
    "train.iterations=2", "train.batch_size=4", "train.checkpoint_every=1000", "optim.warmup_iters=1",
]


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teacher_tiles")
    for i, (_, tile) in enumerate(slide_tiles()):
        if i == 6:
            break
        Image.fromarray(tile).save(folder / f"t{i}.png")
    return folder


def _config(tiles, out, *extra):
    return load_config(None, [f"output_dir={out}", f"data.sources=[{tiles}]", *TINY, *extra])


def _cnn_weights(path, seed=3):
    torch.manual_seed(seed)
    model = timm.create_model("test_efficientnet")  # with its classifier, as a downloaded checkpoint has
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model


def test_a_timm_cnn_by_name_with_local_weights_trains(tiles, tmp_path):
    reference = _cnn_weights(tmp_path / "cnn.safetensors")
    config = _config(tiles, tmp_path / "run", "teacher.model=test_efficientnet",
                     f"teacher.weights={tmp_path / 'cnn.safetensors'}")
    teacher = build_teacher(config)  # used to be: EfficientNet.__init__() got an unexpected 'dynamic_img_size'
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in teacher.state_dict().items())
    result = train(config)
    assert result.finished and (result.export_dir / "model.safetensors").exists()
    assert "test_efficientnet" in (result.export_dir / "README.md").read_text()


def test_a_cnn_feature_map_becomes_patch_tokens_with_its_mean_as_cls(tiles, tmp_path):
    config = _config(tiles, tmp_path, "teacher.model=test_efficientnet", "teacher.pretrained=false")
    cnn = build_teacher(config)
    teacher, dim = as_token_teacher(cnn, config, torch.device("cpu"))
    assert isinstance(teacher, FeatureMapTeacher) and dim == cnn.num_features
    images = torch.randn(2, 3, 64, 64)
    fmap = cnn.forward_features(images)
    out = teacher.forward_features(images)
    assert out.shape == (2, 1 + fmap.shape[2] * fmap.shape[3], dim)
    torch.testing.assert_close(out[:, 1 + fmap.shape[3]], fmap[:, :, 1, 0])  # row by row
    torch.testing.assert_close(out[:, 0], fmap.mean((2, 3)))


def test_a_cnn_folder_and_null_model_args_are_accepted(tiles, tmp_path):
    folder = tmp_path / "cnn_folder"
    folder.mkdir()
    _cnn_weights(folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"architecture": "test_efficientnet", "num_classes": 1000}))
    config = _config(tiles, tmp_path / "run", f"teacher.model={folder}")
    assert build_teacher(config).num_classes == 0
    config = _config(tiles, tmp_path / "run", "teacher.model=vit_tiny_patch16_224", "teacher.pretrained=false",
                     "teacher.model_args={dynamic_img_size: null, depth: 1}")
    assert not build_teacher(config).dynamic_img_size  # null: timm's default, not h0mini's


class _Tokens(torch.nn.Module):
    """A user's module: CLS + a 4 x 4 grid of tokens, no patch_embed, no patch_size."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Conv2d(3, 12, 14, 14)

    def forward(self, x):
        patches = self.proj(x).flatten(2).transpose(1, 2)
        return torch.cat([patches.mean(1, keepdim=True), patches], 1)


class _Embedding(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 10)

    def forward(self, x):
        return self.proj(x.mean((2, 3)))


def test_any_module_returning_tokens_trains_without_a_wrapper(tiles, tmp_path):
    result = train(_config(tiles, tmp_path / "run"), teacher=_Tokens())  # used to say: exposes no patch size
    assert result.finished


def test_an_embedding_teacher_is_refused_for_patch_targets_and_trains_without(tiles, tmp_path):
    with pytest.raises(ConfigError, match="'feature.patch_weight'.*one 10-d embedding per image"):
        train(_config(tiles, tmp_path / "a"), teacher=_Embedding())
    assert train(_config(tiles, tmp_path / "b", "feature.patch_weight=0"), teacher=_Embedding()).finished


@pytest.mark.parametrize("extra, field", [
    (["teacher.model_args={embed_dim:24}"], "teacher.model_args"),  # YAML without the space
    (["teacher.model=test_efficientnet", "teacher.model_args={no_such_arg: 1}"], "teacher.model_args"),
    (["teacher.model=test_efficientnet", "teacher.weights=/nonexistent/w.safetensors"], "teacher.weights"),
])
def test_bad_teacher_settings_name_the_field(tiles, tmp_path, extra, field, capsys):
    args = [f"output_dir={tmp_path}", f"data.sources=[{tiles}]", *TINY, *extra]
    assert main(args) == 1
    assert f"'{field}'" in capsys.readouterr().err
