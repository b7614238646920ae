"""h0mini.distill data, augmentation and config: sources, seeded splitting, resume, crops, blur probability."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from h0mini.distill.augment import MultiCrop, hed_jitter
from h0mini.distill.config import AugmentConfig, ConfigError, CropsConfig, DistillConfig, load_config, parse_overrides, validate_patch_size
from h0mini.distill.data import FeistelPermutation, Sources, TileStream, brace_expand, build_loader, resolve_sources, Shard, decode


def _tiles(n: int, size: int = 32):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(n)]


@pytest.fixture(scope="module")
def tile_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiles")
    for i, tile in enumerate(_tiles(20)):
        Image.fromarray(tile).save(folder / f"tile_{i:03d}.png")
    return folder


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder, n_shards: int, per_shard: int, *, json_sidecars: bool = False, corrupt=()):
    """WebDataset-style tar shards of random PNG tiles; samples ``(shard, j)`` in ``corrupt`` hold garbage."""
    tiles = _tiles(n_shards * per_shard)
    for s in range(n_shards):
        with tarfile.open(folder / f"tiles-{s:04d}.tar", "w") as tar:
            for j in range(per_shard):
                buffer = io.BytesIO()
                Image.fromarray(tiles[s * per_shard + j]).save(buffer, format="PNG")
                _add(tar, f"s{s}_{j:03d}.png", b"not a png" if (s, j) in corrupt else buffer.getvalue())
                if json_sidecars:
                    _add(tar, f"s{s}_{j:03d}.json", b"{}")
    return folder


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"), 4, 6, json_sidecars=True)


def _stream(sources, *, rank=0, world=1, batch=2, start=0, end=10, workers=1, masks=False):
    crops = CropsConfig(global_size=28, n_local=1, local_size=14)
    transform = MultiCrop(crops, AugmentConfig(), (0.5,) * 3, (0.25,) * 3)
    return TileStream(sources, transform, seed=3, rank=rank, world_size=world, local_batch=batch, start_step=start,
                      end_step=end, shuffle=True, mask_grid=(2, 2) if masks else None)


def test_brace_patterns_and_sources(tile_folder, shards, tmp_path):
    assert brace_expand("a-{008..010}.tar") == ["a-008.tar", "a-009.tar", "a-010.tar"]
    assert brace_expand("{x,y}{1..2}") == ["x1", "x2", "y1", "y2"]
    assert len(resolve_sources([str(tile_folder)]).files) == 20
    listing = tmp_path / "tiles.txt"
    listing.write_text("# two tiles\n" + "\n".join(str(p) for p in sorted(tile_folder.glob("*.png"))[:2]) + "\n")
    assert len(resolve_sources([str(listing)]).files) == 2
    assert len(resolve_sources([str(shards / "tiles-{0000..0003}.tar")]).shards) == 4
    for bad, words in (([str(tmp_path / "nope")], "neither"), ([str(shards / "tiles-{0000..0009}.tar")], "does not exist"),
                       ([str(tile_folder), str(shards / "tiles-0000.tar")], "mixes")):
        with pytest.raises(ConfigError, match=words) as error:
            resolve_sources(bad)
        assert error.value.field == "data.sources"


def test_feistel_is_a_seeded_bijection():
    for n in (1, 2, 7, 100, 1000):
        perm = [FeistelPermutation(n, key=5)(i) for i in range(n)]
        assert sorted(perm) == list(range(n))
    a = [FeistelPermutation(100, key=1)(i) for i in range(100)]
    b = [FeistelPermutation(100, key=2)(i) for i in range(100)]
    assert a != b and a != list(range(100))


def test_indexed_ranks_cover_an_epoch_once_and_match_one_rank(tile_folder):
    sources = resolve_sources([str(tile_folder)])
    seen = []
    for step in range(5):  # 5 steps x 4 tiles = the 20 tiles once
        for rank in range(2):
            seen += _stream(sources, rank=rank, world=2)._indexed_batch(step)
    assert sorted(index for _, _, index in seen) == list(range(20))
    # one rank with the global batch reads the same tiles with the same seeds, in the same order
    single = [s for step in range(5) for s in _stream(sources, batch=4)._indexed_batch(step)]
    assert [(seed, index) for _, seed, index in single] == [(seed, index) for _, seed, index in seen]


def test_loader_workers_keep_step_order_and_crops_are_layout_independent(tile_folder):
    config = DistillConfig()
    config.data.sources, config.data.num_workers = [str(tile_folder)], 2
    config.crops.global_size, config.crops.local_size, config.crops.n_local = 28, 14, 2
    config.train.iterations, config.objective.dinov2 = 6, 1.0
    sources = resolve_sources(config.data.sources)
    with_workers = list(build_loader(config, sources, rank=0, world_size=1, local_batch=2, start_step=1, patch_size=14))
    assert [int(b["step"]) for b in with_workers] == [1, 2, 3, 4, 5]
    config.data.num_workers = 0
    plain = list(build_loader(config, sources, rank=0, world_size=1, local_batch=2, start_step=3, patch_size=14))
    for a, b in zip(with_workers[2:], plain):
        assert torch.equal(a["global_crops"], b["global_crops"]) and torch.equal(a["masks"], b["masks"])
    batch = plain[0]
    assert batch["global_crops"].shape == (4, 3, 28, 28)  # crop-major: 2 global crops x 2 tiles
    assert batch["local_crops"].shape == (4, 3, 14, 14)
    assert batch["masks"].shape == (4, 4) and batch["masks"].dtype == torch.bool


def test_shards_split_without_duplicates_and_resume_exactly(shards):
    sources = Sources(files=[], shards=resolve_sources([str(shards / "tiles-*.tar")]).shards)
    # 2 ranks x 2 workers = 4 consumers, one shard each: 6 steps of 1 tile per consumer is the epoch.
    seen = []
    for rank in range(2):
        for role in range(2):
            stream = _stream(sources, rank=rank, world=2, batch=1, workers=2)
            seen += [index for _, _, index in _take(stream._consumer_samples(rank * 2 + role, 4, 0), 6)]
    assert len(seen) == 24 and len(set(seen)) == 24
    # resuming at step 5 replays exactly what the uninterrupted stream yields from step 5 on
    full = list(_stream(sources, batch=3, start=0, end=9, workers=1))
    resumed = list(_stream(sources, batch=3, start=5, end=9, workers=1))
    for a, b in zip(full[5:], resumed):
        assert torch.equal(a["indices"], b["indices"]) and torch.equal(a["global_crops"], b["global_crops"])
    config = DistillConfig()
    config.data.sources, config.data.num_workers = [str(shards / "tiles-*.tar")], 4
    with pytest.raises(ConfigError, match="shards cannot feed") as error:
        build_loader(config, sources, rank=0, world_size=2, local_batch=1, start_step=0, patch_size=14)
    assert error.value.field == "data.sources"


def test_gzipped_shards_rgba_tiles_and_a_vanished_dataset(tmp_path):
    rgba = Image.new("RGBA", (28, 28), (200, 30, 30, 0))  # fully transparent: glass, so white
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG")
    with tarfile.open(tmp_path / "tiles-000.tar.gz", "w:gz") as tar:
        for j in range(3):
            _add(tar, f"t{j}.png", buffer.getvalue())
    shard = Shard(resolve_sources([str(tmp_path / "tiles-*.tar.gz")]).shards[0])
    assert len(shard) == 3
    (_, data), *_ = shard.read([0])
    assert torch.equal(decode(data, shard.url), torch.full((3, 28, 28), 255, dtype=torch.uint8))

    folder = tmp_path / "gone"
    folder.mkdir()
    for j in range(20):
        (folder / f"t{j:02d}.png").write_bytes(b"not an image")  # as an unmounted or emptied disk reads
    stream = _stream(Sources(files=resolve_sources([str(folder)]).files, shards=[]))
    with pytest.raises(ConfigError, match="16 tiles in a row"):
        next(iter(stream))


def test_a_resume_after_an_unreadable_shard_sample_replays_exactly(tmp_path):
    write_shards(tmp_path, 2, 6, corrupt={(0, 1)})
    sources = Sources(files=[], shards=resolve_sources([str(tmp_path / "tiles-*.tar")]).shards)
    full = list(_stream(sources, batch=2, start=0, end=6))
    for start in (2, 4):  # past the corrupt sample, wherever the shuffle put it
        resumed = list(_stream(sources, batch=2, start=start, end=6))
        for a, b in zip(full[start:], resumed):
            assert torch.equal(a["indices"], b["indices"]) and torch.equal(a["global_crops"], b["global_crops"])


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_hed_jitter_identity_and_effect():
    image = torch.rand(3, 16, 16) * 0.8 + 0.1
    assert torch.allclose(hed_jitter(image, [1, 1, 1], [0, 0, 0]), image, atol=1e-5)
    stronger_h = hed_jitter(image, [1.3, 1, 1], [0, 0, 0])
    assert (stronger_h.mean(dim=(1, 2)) < image.mean(dim=(1, 2))).all()  # more stain, darker


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_blur_happens_with_the_configured_probability(p):
    # Only the blur is on: count how often the crop changes (DINOv2's public code blurs with 1 - p).
    augment = AugmentConfig(hflip=0, vflip=0, rot90=False, hed_jitter=0, color_jitter=0, grayscale=0,
                            blur_global=(p, p), blur_sigma=(1.5, 2.0))
    crop = MultiCrop(CropsConfig(global_size=16, n_local=0), augment, (0,) * 3, (1,) * 3)
    image = torch.rand(3, 16, 16)
    spec = crop.global_specs[0]
    changed = 0
    for seed in range(300):
        out = crop.photometric(image, spec, torch.Generator().manual_seed(seed))
        changed += not torch.allclose(out, image)
    assert changed / 300 == pytest.approx(p, abs=0.07)


def test_crops_are_seeded(tile_folder):
    crop = MultiCrop(CropsConfig(global_size=28, n_local=2, local_size=14), AugmentConfig(), (0.5,) * 3, (0.2,) * 3)
    tile = torch.from_numpy(_tiles(1, 40)[0]).permute(2, 0, 1)
    a = crop(tile, torch.Generator().manual_seed(1))
    b = crop(tile, torch.Generator().manual_seed(1))
    c = crop(tile, torch.Generator().manual_seed(2))
    assert torch.equal(a["global_crops"], b["global_crops"]) and not torch.equal(a["global_crops"], c["global_crops"])
    assert a["global_crops"].shape == (2, 3, 28, 28) and a["local_crops"].shape == (2, 3, 14, 14)


def test_config_file_overrides_and_errors_name_the_field(tmp_path, tile_folder):
    path = tmp_path / "my.yaml"
    path.write_text(f"train:\n  iterations: 10\ndata:\n  sources: [{tile_folder}]\n")
    config = load_config(str(path), ["train.batch_size=64", "optim.base_lr=2e-3", "crops.global_scale=[0.4, 1]"])
    assert (config.train.iterations, config.train.batch_size, config.optim.base_lr) == (10, 64, 0.002)
    assert config.crops.global_scale == (0.4, 1.0)
    assert config.lr() == pytest.approx(0.002 * 0.25)  # sqrt(64 / 1024)
    assert parse_overrides(["a.b=1", "a.c=x"]) == {"a": {"b": 1, "c": "x"}}
    for overrides, field in ((["train.iterations=ten"], "train.iterations"), (["train.nope=1"], "train.nope"),
                             (["augment.hflip=2"], "augment.hflip"), (["data.sources=[]"], "data.sources"),
                             (["crops.local_scale=[0.5, 0.1]"], "crops.local_scale"),
                             (["student.model_args={embed_dim:24}"], "student.model_args"),  # no space: a null value
                             (["teacher.model_args={1: 2}"], "teacher.model_args")):
        with pytest.raises(ConfigError) as error:
            load_config(str(path), overrides)
        assert error.value.field == field and field in str(error.value)
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  iterations: [10\n")
    with pytest.raises(ConfigError) as error:
        load_config(str(broken))
    assert error.value.field == "--config" and "not valid YAML" in str(error.value)


def test_the_teacher_patch_size_constrains_global_crops_only():
    config = load_config(None, ["crops.global_size=224", "crops.local_size=98", "data.sources=[x]"])
    validate_patch_size(config, 16, "teacher", local_crops=False)  # a /16 teacher never sees the 98 px local crops
    with pytest.raises(ConfigError, match="crops.local_size"):
        validate_patch_size(config, 16, "student")
