"""HEST-Benchmark: gene-expression prediction from H&E patches, scored as HEST scores it.

The protocol was read from mahmoodlab/HEST ``src/hest/bench/benchmark.py`` and ``trainer.py``
(stored versions at 0512f57a; the issue names afd42c3, which the code index does not hold) and
``st_dataset.py`` (``load_adata``, ``normalize_adata``). Per fold ``i`` of a task folder:

* the embeddings of every sample of ``splits/train_i.csv`` / ``test_i.csv`` are read with their
  patch barcodes; the expression of the genes in ``var_50genes.json`` is taken for exactly those
  barcodes, in patch order, cast to float64 and ``log1p``-transformed (HEST's ``normalize=True``);
  spots of the ``.h5ad`` without a patch are therefore dropped (h0mini counts them);
* ``StandardScaler`` then ``PCA(n_components=256, random_state=seed)`` fit on the training fold,
  applied to both folds, and the result cast to float32 (HEST wraps it in ``torch.Tensor``). The
  embeddings reach ``StandardScaler`` in the dtype their h5 file holds: HEST's ``save_hdf5`` and
  ``read_assets_from_h5`` (``utils/file_utils.py`` @ d3a281ba) keep the dtype and ``benchmark.py``
  casts nothing before sklearn, so h0mini does not either (a float16 file is standardised in
  float16, as scikit-learn does for float16 input, and PCA then works in float64);
* ``Ridge(solver="lsqr", alpha=100 / (n_components * n_genes), fit_intercept=False,
  max_iter=1000, random_state=seed)`` fit on the training fold;
* ``scipy.stats.pearsonr`` per gene between the test fold's targets and predictions (all test
  samples pooled); the fold score is the mean over genes.

The task score is the mean of the fold scores (``pearson_mean``), ``pearson_std`` their
(population) standard deviation; per gene, the fold correlations with their mean and std, sorted by
mean, best first: HEST's ``results_kfold.json``. HEST's default seed is 1.

Precision. The leaderboard embeds H0-mini with HEST's ``H0MiniInferenceEncoder``
(``cpath_model_zoo/inference_models.py`` @ 568df6ce): ``precision = torch.float16``, which
``embed_tiles`` uses as ``torch.cuda.amp.autocast(dtype=...)`` around the forward pass, and the CLS
token ``output[:, 0]`` of timm's ViT. Under CUDA autocast the ViT's final ``layer_norm`` runs in
float32 (PyTorch's autocast op reference lists it among the ops that autocast to float32), so the
CLS token leaves the model, and is stored, as float32 computed from an fp16 forward pass.
``h0mini.embed_tiles`` with ``precision="auto"`` on CUDA does the same (fp16 autocast, tokens taken
as float32), so embeddings made here are float32 like HEST's, and the cast in ``embed_patches`` is
a no-op for them.

Two options are *not* the leaderboard protocol and are labelled so in the results
(``"protocol"``): ``alpha="cv"`` (alpha chosen by an inner 5-fold CV on the training fold, as in
HEST PR #140) and ``dimreduce=None`` (ridge on the raw embeddings, HEST paper Table A13).
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import EvaluationInputError
from .common import import_optional

logger = logging.getLogger(__name__)

HEST_TASKS = ("IDC", "PRAD", "PAAD", "SKCM", "COAD", "READ", "CCRCC", "LUNG", "LYMPH_IDC")
"""The leaderboard's tasks in its column order (HEST README, results of 03.04.26)."""

LEADERBOARD = "leaderboard (HEST-Benchmark: StandardScaler + PCA(256) + Ridge alpha=100/(256*n_genes))"
GENE_LIST = "var_50genes.json"
N_COMPONENTS = 256
SEED = 1
CV_ALPHAS = tuple(10.0 ** k for k in range(-4, 5))
"""The alphas the tuned track (``alpha="cv"``) chooses from."""

PathLike = Union[str, os.PathLike]


class HestWarning(UserWarning):
    """A HEST-Benchmark input that scores but deserves a look (a constant gene: NaN Pearson)."""


@dataclass
class _Sample:
    sample_id: str
    embeddings: np.ndarray
    barcodes: List[str]
    expression: np.ndarray  # (n_patches, n_genes) float64, log1p
    unmatched_spots: int  # spots of the h5ad without a patch (dropped, as HEST does)


# ----------------------------------------------------------------------------- task folder


def read_split(task_dir: PathLike, name: str) -> List[Dict[str, str]]:
    """Rows of ``splits/<name>.csv`` (``sample_id``, ``patches_path``, ``expr_path``)."""
    pd = import_optional("pandas", "HEST-Benchmark")
    path = Path(task_dir) / "splits" / f"{name}.csv"
    if not path.is_file():
        raise EvaluationInputError(f"{path} not found: a HEST-bench task folder has splits/train_i.csv and test_i.csv")
    frame = pd.read_csv(path)
    missing = [c for c in ("sample_id", "patches_path", "expr_path") if c not in frame.columns]
    if missing:
        raise EvaluationInputError(f"{path} lacks the column(s) {missing}; HEST's split files have sample_id, patches_path, expr_path")
    return [{k: str(row[k]) for k in ("sample_id", "patches_path", "expr_path")} for _, row in frame.iterrows()]


def n_folds(task_dir: PathLike) -> int:
    """How many folds a task has: HEST counts the files in ``splits/`` and halves it."""
    split_dir = Path(task_dir) / "splits"
    if not split_dir.is_dir():
        raise EvaluationInputError(f"{split_dir} not found: is {task_dir} a HEST-bench task folder (e.g. bench_data/IDC)?")
    count = len(os.listdir(split_dir)) // 2
    for i in range(count):
        for kind in ("train", "test"):
            if not (split_dir / f"{kind}_{i}.csv").is_file():
                raise EvaluationInputError(f"{split_dir} has no {kind}_{i}.csv; HEST expects train_0..train_{count - 1} and test_0..test_{count - 1}")
    if count == 0:
        raise EvaluationInputError(f"{split_dir} is empty")
    return count


def read_genes(task_dir: PathLike, gene_list: str = GENE_LIST) -> List[str]:
    path = Path(task_dir) / gene_list
    if not path.is_file():
        raise EvaluationInputError(f"{path} not found: HEST-bench tasks list their genes in {GENE_LIST}")
    with open(path) as f:
        genes = json.load(f)["genes"]
    return [str(g) for g in genes]


def _decode(values: np.ndarray) -> List[str]:
    flat = np.asarray(values).reshape(-1)
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in flat]


def read_embeddings(path: PathLike) -> Tuple[np.ndarray, List[str], np.ndarray]:
    """``embeddings``, ``barcodes`` and ``coords`` of one HEST embedding h5."""
    import h5py

    with h5py.File(path, "r") as f:
        missing = [k for k in ("embeddings", "barcodes") if k not in f]
        if missing:
            raise EvaluationInputError(f"{path} lacks {missing}; HEST embedding files hold embeddings, barcodes and coords")
        embeddings = np.asarray(f["embeddings"][:])
        barcodes = _decode(f["barcodes"][:])
        coords = np.asarray(f["coords"][:]) if "coords" in f else np.zeros((len(barcodes), 2))
    return embeddings, barcodes, coords


def write_embeddings(path: PathLike, embeddings: np.ndarray, barcodes: Sequence[str], coords: np.ndarray,
                     made_with: Optional[Dict[str, Any]] = None) -> None:
    """HEST's embedding layout, written atomically (a temp file, then rename): a finished file is complete.

    ``made_with`` (what made the embeddings) is kept as the file's ``h0mini`` attribute (JSON)."""
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with h5py.File(partial, "w") as f:
        if made_with is not None:
            f.attrs["h0mini"] = json.dumps(made_with, sort_keys=True)
        f.create_dataset("embeddings", data=np.asarray(embeddings))
        f.create_dataset("barcodes", data=np.asarray([b.encode("utf-8") for b in barcodes]).reshape(-1, 1))
        f.create_dataset("coords", data=np.asarray(coords))
    os.replace(partial, path)


def _made_with(model: Any, embedding: str, embed_kwargs: Dict[str, Any], *, loaded_here: bool = False
               ) -> Dict[str, Any]:
    """What changes a sample's cached embeddings: the model (``weights_fingerprint``), the embedding,
    and the options of ``embed_tiles`` that change the numbers. A model loaded here is
    named by its weights file; one passed in by its state (it may have been fine-tuned or cast since
    ``load_model`` read its file)."""
    if not hasattr(model, "state_dict"):  # an exported model (OnnxModel): named by its file
        weights = f"{type(model).__name__}:{os.fspath(getattr(model, 'model_path', '') or '')}"
    else:
        from ..model import weights_fingerprint

        weights = weights_fingerprint(model, state=not loaded_here)
    made = {"model": weights, "embedding": embedding, "precision": str(embed_kwargs.get("precision") or "auto")}
    if embed_kwargs.get("input_size") is not None:  # the revision is in the weights' fingerprint
        made["input_size"] = str(embed_kwargs["input_size"])
    return made


def _cached_made_with(path: Path) -> Optional[Dict[str, Any]]:
    import h5py

    with h5py.File(path, "r") as f:
        value = f.attrs.get("h0mini")
    if value is None:
        return None
    return json.loads(value.decode() if isinstance(value, bytes) else str(value))


def embed_patches(patches_path: PathLike, model: Any, *, embedding: str = "cls", **embed_kwargs: Any) -> Tuple[np.ndarray, List[str], np.ndarray]:
    """Embed the ``img`` stack of a HEST patch h5 with ``h0mini.embed_tiles``; its barcodes and coords."""
    import h5py

    from ..embed import embed_tiles

    with h5py.File(patches_path, "r") as f:
        key = "barcode" if "barcode" in f else "barcodes"
        if "img" not in f or key not in f:
            raise EvaluationInputError(f"{patches_path} lacks img/barcode; HEST patch files hold img, barcode and coords")
        images = np.asarray(f["img"][:])
        barcodes = _decode(f[key][:])
        coords = np.asarray(f["coords"][:]) if "coords" in f else np.zeros((len(barcodes), 2))
    embeddings = embed_tiles(images, model, embedding=embedding, **embed_kwargs)
    # float32, as HEST's H0-mini encoder returns under fp16 autocast (its last op, layer_norm, runs in
    # float32); embed_tiles already returns float32 unless told otherwise (return_dtype).
    return np.asarray(embeddings, dtype=np.float32), barcodes, coords


def read_expression(expr_path: PathLike, barcodes: Sequence[str], genes: Sequence[str], *, sample_id: str) -> Tuple[np.ndarray, int]:
    """log1p (float64) expression of ``genes`` at ``barcodes``, in their order; and the spots without a patch."""
    anndata = import_optional("anndata", "HEST-Benchmark")
    adata = anndata.read_h5ad(expr_path)
    obs = adata.obs_names
    if not obs.is_unique:
        raise EvaluationInputError(f"sample {sample_id}: {expr_path} has duplicate spot barcodes; HEST selects spots by barcode")
    rows = obs.get_indexer(list(barcodes))
    if (rows < 0).any():
        lost = [b for b, r in zip(barcodes, rows) if r < 0]
        raise EvaluationInputError(
            f"sample {sample_id}: {len(lost)} patch barcode(s) are not spots of {expr_path} (first: {lost[:3]}); "
            "the patches and the expression file must come from the same HEST-bench release"
        )
    cols = adata.var_names.get_indexer(list(genes))
    if (cols < 0).any():
        lost = [g for g, c in zip(genes, cols) if c < 0]
        raise EvaluationInputError(f"sample {sample_id}: gene(s) {lost} of the gene list are not in {expr_path}")
    matrix = adata.X[rows][:, cols]
    if hasattr(matrix, "toarray"):
        matrix = matrix.toarray()
    expression = np.log1p(np.asarray(matrix, dtype=np.float64))
    unmatched = adata.n_obs - len(set(rows.tolist()))
    return expression, unmatched


# ----------------------------------------------------------------------------- the regression


def _pearson(target: np.ndarray, pred: np.ndarray, *, gene: str, where: str) -> float:
    stats = import_optional("scipy", "HEST-Benchmark").stats
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's ConstantInputWarning: reported below by name
        r = float(stats.pearsonr(target, pred)[0])
    if math.isnan(r):
        warnings.warn(
            f"{where}: gene {gene} is constant in the test fold or its prediction, so its Pearson r is NaN "
            "(HEST keeps the NaN, and the fold mean becomes NaN)",
            HestWarning,
            stacklevel=3,
        )
    return r


def _reduce(x_train: np.ndarray, x_test: np.ndarray, *, n_components: int, seed: int, where: str) -> Tuple[np.ndarray, np.ndarray]:
    sklearn = import_optional("scikit-learn", "HEST-Benchmark")
    from sklearn.decomposition import PCA
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    del sklearn
    largest = min(x_train.shape)
    if n_components > largest:
        raise EvaluationInputError(
            f"{where}: PCA({n_components}) needs at least {n_components} training spots and embedding dimensions, "
            f"got {x_train.shape[0]} spots of dimension {x_train.shape[1]}; pass n_components<={largest} "
            "(not the leaderboard protocol) or check the split"
        )
    pipe = Pipeline([("scaler", StandardScaler()), ("PCA", PCA(n_components=n_components, random_state=seed))])
    # HEST wraps both in torch.Tensor: float32, with the strides sklearn returned (fit_transform's U * S
    # is column-major). The layout matters: LSQR in float32 stops after a few iterations, and BLAS's
    # summation order then moves Pearson r by ~1e-5. astype(order="K") keeps it, as torch does.
    return pipe.fit_transform(x_train).astype(np.float32), pipe.transform(x_test).astype(np.float32)


def _ridge(alpha: float, seed: int) -> Any:
    from sklearn.linear_model import Ridge

    return Ridge(solver="lsqr", alpha=alpha, random_state=seed, fit_intercept=False, max_iter=1000)


def _cv_alpha(x: np.ndarray, y: np.ndarray, seed: int) -> float:
    """Inner 5-fold CV on the training fold: the alpha of ``CV_ALPHAS`` with the best mean gene Pearson."""
    from sklearn.model_selection import KFold

    best, best_score = CV_ALPHAS[0], -np.inf
    for alpha in CV_ALPHAS:
        scores = []
        for inner_train, inner_val in KFold(5, shuffle=True, random_state=seed).split(x):
            pred = _ridge(alpha, seed).fit(x[inner_train], y[inner_train]).predict(x[inner_val])
            truth = y[inner_val]
            with np.errstate(invalid="ignore", divide="ignore"):
                pc = pred - pred.mean(0)
                tc = truth - truth.mean(0)
                r = (pc * tc).sum(0) / np.sqrt((pc**2).sum(0) * (tc**2).sum(0))
            scores.append(np.nanmean(r) if np.isfinite(r).any() else -np.inf)
        score = float(np.mean(scores))
        if score > best_score:
            best, best_score = alpha, score
    return best


def regress_fold(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    genes: Sequence[str],
    *,
    n_components: Optional[int] = N_COMPONENTS,
    alpha: Union[float, str, None] = None,
    seed: int = SEED,
    where: str = "fold",
) -> Dict[str, Any]:
    """One HEST fold: (PCA) + ridge + Pearson per gene; HEST's per-fold ``results.json`` fields."""
    if n_components is not None:
        x_train, x_test = _reduce(x_train, x_test, n_components=n_components, seed=seed, where=where)
    if alpha is None:
        alpha_value = 100 / (x_train.shape[1] * y_train.shape[1])
    elif alpha == "cv":
        alpha_value = _cv_alpha(x_train, y_train, seed)
    else:
        alpha_value = float(alpha)
    preds = _ridge(alpha_value, seed).fit(x_train, y_train).predict(x_test)
    corrs, l2, r2 = [], [], []
    for j, gene in enumerate(genes):
        target, pred = y_test[:, j], preds[:, j]
        l2.append(float(np.mean((pred - target) ** 2)))
        r2.append(float(1 - np.sum((target - pred) ** 2) / np.sum((target - np.mean(target)) ** 2)) if np.ptp(target) else float("nan"))
        corrs.append(_pearson(target, pred, gene=gene, where=where))
    return {
        "l2_errors": l2,
        "r2_scores": r2,
        "pearson_corrs": [{"name": g, "pearson_corr": r} for g, r in zip(genes, corrs)],
        "pearson_mean": float(np.mean(corrs)),
        "pearson_std": float(np.std(corrs)),
        "n_train": int(len(y_train)),
        "n_test": int(len(y_test)),
        "alpha": alpha_value,
    }


def merge_folds(folds: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """HEST's ``results_kfold.json``: per gene its fold correlations, mean and std (best first)."""
    per_gene: Dict[str, List[float]] = {}
    for fold in folds:
        for item in fold["pearson_corrs"]:
            per_gene.setdefault(item["name"], []).append(item["pearson_corr"])
    genes = [{"name": g, "pearson_corrs": v, "mean": float(np.mean(v)), "std": float(np.std(v))} for g, v in per_gene.items()]
    genes.sort(key=lambda d: d["mean"], reverse=True)
    means = [fold["pearson_mean"] for fold in folds]
    return {"pearson_corrs": genes, "pearson_mean": float(np.mean(means)), "pearson_std": float(np.std(means)), "mean_per_split": means}


# ----------------------------------------------------------------------------- the benchmark


def hest_benchmark(
    task_dir: PathLike,
    model: Any = None,
    *,
    embeddings: Optional[PathLike] = None,
    embedding: str = "cls",
    cache_dir: Optional[PathLike] = None,
    output_dir: Optional[PathLike] = None,
    n_components: Optional[int] = N_COMPONENTS,
    dimreduce: Optional[str] = "PCA",
    alpha: Union[float, str, None] = None,
    seed: int = SEED,
    gene_list: str = GENE_LIST,
    **embed_kwargs: Any,
) -> Dict[str, Any]:
    """Score embeddings on one HEST-Benchmark task folder (e.g. ``hest-bench/bench_data/IDC``).

    Args:
        task_dir: a task folder as published on the Hub (``MahmoodLab/hest-bench``): ``splits/``,
            ``patches/*.h5``, ``adata/*.h5ad``, ``var_50genes.json``.
        model: what ``h0mini.embed_tiles`` takes (a loaded model, weights). Default: H0-mini.
        embeddings: a folder of ``<sample_id>.h5`` embedding files in HEST's layout
            (``embeddings``, ``barcodes``, ``coords``); nothing is embedded then.
        embedding: which embedding (``"cls"``: the leaderboard's; ``"cls+mean"``: the H0-mini paper's).
            ``"cls"`` with ``precision="auto"`` (fp16 on CUDA) is the leaderboard's setting.
        cache_dir: where embeddings are cached per sample (HEST's layout). A sample whose file
            exists is not embedded again, so an interrupted run resumes; a file made by another
            model, embedding, precision or input size is refused (its ``h0mini`` attribute says
            what made it). Default: ``embeddings/`` in ``output_dir``, or nowhere (kept in memory)
            without one.
        output_dir: where ``results_kfold.json`` and ``split<i>/results.json`` are written.
        n_components: PCA components (HEST's ``latent_dim``, 256).
        dimreduce: ``"PCA"`` (the leaderboard) or ``None``: ridge on the raw embeddings, *not the
            leaderboard protocol*.
        alpha: ``None``: HEST's ``100 / (n_components * n_genes)``; ``"cv"``: chosen by an inner
            5-fold CV on each training fold (*not the leaderboard protocol*); or a number.
        seed: PCA's and ridge's random_state (HEST's default 1).
        embed_kwargs: passed to ``embed_tiles`` (``batch_size``, ``device``, ``precision``...).

    Returns:
        HEST's ``results_kfold.json`` dict (``pearson_mean``, ``pearson_std``, ``mean_per_split``,
        ``pearson_corrs``) plus ``protocol``, ``task``, ``folds`` (per-fold results) and
        ``dropped_spots`` (spots without a patch, per sample).

    Raises:
        EvaluationInputError: a missing file, barcode or gene, a fold smaller than the PCA.
    """
    task_dir = Path(task_dir)
    if dimreduce not in ("PCA", None):
        raise EvaluationInputError(f"dimreduce must be 'PCA' or None, got {dimreduce!r}")
    components = n_components if dimreduce == "PCA" else None
    official = dimreduce == "PCA" and n_components == N_COMPONENTS and alpha is None
    protocol = LEADERBOARD if official else (
        "NOT the leaderboard protocol: "
        + ", ".join(
            part
            for part in (
                "no PCA (dimreduce=None)" if dimreduce is None else (f"PCA({n_components})" if n_components != N_COMPONENTS else ""),
                "alpha by inner 5-fold CV" if alpha == "cv" else (f"alpha={alpha}" if alpha is not None else ""),
            )
            if part
        )
    )
    genes = read_genes(task_dir, gene_list)
    folds_n = n_folds(task_dir)
    if cache_dir is None and embeddings is None and output_dir is not None:
        cache_dir = Path(output_dir) / "embeddings"
    loaded: Dict[str, _Sample] = {}
    identity: List[Dict[str, Any]] = []
    embed_kwargs = dict(embed_kwargs)
    models: List[Any] = []
    loaded_here = model is None or isinstance(model, (str, os.PathLike))

    def embedder() -> Any:  # loaded once, when a sample is first embedded or a cache first checked
        if not models:
            if loaded_here:
                from ..model import load_model

                loading = {k: embed_kwargs.pop(k) for k in ("revision", "token", "cache_dir") if k in embed_kwargs}
                models.append(load_model(model, **loading))
            else:
                models.append(model)
        return models[0]

    def made_with() -> Dict[str, Any]:  # the weights' content, not their name: a replaced checkpoint re-embeds
        if not identity:
            identity.append(_made_with(embedder(), embedding, embed_kwargs, loaded_here=loaded_here))
        return identity[0]

    def sample(row: Dict[str, str]) -> _Sample:
        sid = row["sample_id"]
        if sid in loaded:
            return loaded[sid]
        if embeddings is not None:
            path = Path(embeddings) / f"{sid}.h5"
            if not path.is_file():
                raise EvaluationInputError(f"sample {sid}: no embedding file {path}")
            emb, barcodes, _ = read_embeddings(path)
        else:
            cached = Path(cache_dir) / f"{sid}.h5" if cache_dir is not None else None
            if cached is not None and cached.is_file():
                saved = _cached_made_with(cached)
                if saved is not None and saved != made_with():
                    raise EvaluationInputError(
                        f"sample {sid}: the cached embeddings {cached} were made with {saved}, not "
                        f"{made_with()}; pass another cache_dir (or output_dir), or delete the cache to embed again")
                emb, barcodes, _ = read_embeddings(cached)
            else:
                patches = task_dir / row["patches_path"]
                if not patches.is_file():
                    raise EvaluationInputError(f"sample {sid}: patch file {patches} not found")
                emb, barcodes, coords = embed_patches(patches, embedder(), embedding=embedding, **embed_kwargs)
                if cached is not None:
                    write_embeddings(cached, emb, barcodes, coords, made_with())
        expression, unmatched = read_expression(task_dir / row["expr_path"], barcodes, genes, sample_id=sid)
        if unmatched:
            logger.info("sample %s: %d spot(s) without a patch dropped, as HEST drops them", sid, unmatched)
        loaded[sid] = _Sample(sid, np.asarray(emb), barcodes, expression, unmatched)
        return loaded[sid]

    fold_results = []
    for i in range(folds_n):
        train = [sample(r) for r in read_split(task_dir, f"train_{i}")]
        test = [sample(r) for r in read_split(task_dir, f"test_{i}")]
        where = f"{task_dir.name} fold {i} (test: {', '.join(s.sample_id for s in test)})"
        result = regress_fold(
            np.concatenate([s.embeddings for s in train]),
            np.concatenate([s.expression for s in train]),
            np.concatenate([s.embeddings for s in test]),
            np.concatenate([s.expression for s in test]),
            genes,
            n_components=components,
            alpha=alpha,
            seed=seed,
            where=where,
        )
        fold_results.append(result)
        if output_dir is not None:
            _write_json(Path(output_dir) / f"split{i}" / "results.json", result)
    results = merge_folds(fold_results)
    results.update(
        protocol=protocol,
        task=task_dir.name,
        folds=fold_results,
        dropped_spots={s.sample_id: s.unmatched_spots for s in loaded.values()},
    )
    if output_dir is not None:
        _write_json(Path(output_dir) / "results_kfold.json", {k: results[k] for k in ("pearson_corrs", "pearson_mean", "pearson_std", "mean_per_split", "protocol")})
    return results


def _write_json(path: Path, data: Dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w") as f:
        json.dump(data, f, sort_keys=True, indent=4)
    os.replace(partial, path)


def leaderboard_row(scores: Dict[str, float]) -> Tuple[List[str], List[float]]:
    """Columns (``Average`` then tasks, HEST's order first) and values for the tasks scored.

    The mean is called ``Average`` only over all nine HEST-Benchmark tasks, the leaderboard's column;
    over fewer it reads ``Mean of k tasks``, so that it is never mistaken for a leaderboard average.
    """
    rank = {t: i for i, t in enumerate(HEST_TASKS)}
    order = sorted(scores, key=lambda t: (rank.get(t.upper(), len(rank)), t))
    values = [scores[t] for t in order]
    complete = {t.upper() for t in order} >= set(HEST_TASKS)
    label = "Average" if complete else f"Mean of {len(order)} task{'s' if len(order) != 1 else ''}"
    return [label] + order, [float(np.mean(values))] + values


__all__ = [
    "CV_ALPHAS",
    "HEST_TASKS",
    "HestWarning",
    "hest_benchmark",
    "leaderboard_row",
    "merge_folds",
    "read_embeddings",
    "regress_fold",
    "write_embeddings",
]
