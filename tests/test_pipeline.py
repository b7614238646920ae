"""The tile pipeline's consumer side: the batch normalisation, and the model's threads left to the user."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import h0mini
from h0mini.pipeline import _Prepare, prepared_batches
from h0mini.preprocess import Preprocessing
from h0mini.tiles import read_input


@pytest.fixture(scope="module")
def preprocessing() -> Preprocessing:
    return Preprocessing.from_model(timm.create_model("h0mini_test"))


def reference_normalize(preprocessing: Preprocessing, batch: torch.Tensor) -> torch.Tensor:
    """ToTensor + Normalize as torchvision writes them, one batch-sized result per operation."""
    x = batch.float() / 255 if batch.dtype == torch.uint8 else batch.float()
    mean = torch.tensor(preprocessing.mean).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing.std).view(1, 3, 1, 1)
    return (x - mean) / std


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float16, torch.float32])
def test_normalize_gives_torchvisions_values_and_leaves_the_batch_alone(preprocessing, dtype):
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (3, 3, 28, 28), dtype=torch.uint8, generator=generator)
    if dtype != torch.uint8:
        batch = (batch.float() / 255).to(dtype)
    kept = batch.clone()
    got = preprocessing.normalize(batch)
    assert got.dtype == torch.float32
    assert torch.equal(got, reference_normalize(preprocessing, batch))  # bit for bit
    assert torch.equal(batch, kept)
    assert got.data_ptr() != batch.data_ptr()


def tile_files(folder, count: int = 6):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"t{i}.png"
        Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_the_pipeline_leaves_the_models_thread_count_to_the_user(tmp_path, preprocessing):
    """torch's thread count is the user's: lowering it while workers run made H0-mini 39% slower on 2 idle
    cores with 1 worker (13.4 -> 8.4 tiles/s, bf16, benchmarks/cpu_threads.py): the worker idles most of the time."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        seen = [torch.get_num_threads() for _ in prepared_batches(
            read_input(tile_files(tmp_path)), _Prepare(preprocessing), batch_size=2, workers=1, pin=False)]
        assert seen == [3, 3, 3] and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_embeddings_with_workers_equal_those_without(tmp_path):
    paths = tile_files(tmp_path)
    model = timm.create_model("h0mini_test")
    alone = h0mini.embed_tiles(paths, model, num_workers=0, batch_size=4, progress=False)
    shared = h0mini.embed_tiles(paths, model, num_workers=2, batch_size=4, progress=False)
    np.testing.assert_allclose(np.asarray(shared), np.asarray(alone), rtol=0, atol=1e-6)
