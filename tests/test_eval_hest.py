"""HEST-Benchmark scoring against an independent transcription of HEST's arithmetic.

The reference below is written from the protocol (mahmoodlab/HEST src/hest/bench/benchmark.py and
trainer.py, read at 0512f57a), not from HEST's code: standardisation and PCA by numpy's SVD,
the ridge by scipy's LSQR called per gene on the damped system (what ``Ridge(solver="lsqr")``
solves, with its tol 1e-4 and max_iter 1000), Pearson r written out in numpy.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

anndata = pytest.importorskip("anndata")
h5py = pytest.importorskip("h5py")
pd = pytest.importorskip("pandas")
from scipy.sparse.linalg import lsqr  # noqa: E402

from h0mini.errors import EvaluationInputError  # noqa: E402
from h0mini.eval import hest  # noqa: E402

GENES = ["GATA3", "ERBB2", "KRT5", "ACTB", "MKI67"]
DIM = 24
COMPONENTS = 8


def _write_task(root: Path, *, n_patches=(40, 55, 47), extra_spots=5, seed=0, dim=DIM, images=False, constant_gene=None):
    """A HEST-bench task folder: 3 samples, leave-one-out folds, spots without patches, shuffled spot order."""
    rng = np.random.default_rng(seed)
    (root / "splits").mkdir(parents=True)
    (root / "patches").mkdir()
    (root / "adata").mkdir()
    emb_dir = root / "emb"
    emb_dir.mkdir()
    (root / "var_50genes.json").write_text(json.dumps({"genes": GENES}))
    loading = rng.normal(size=(6, dim))  # embeddings with a 6-d signal the PCA keeps
    mixing = rng.normal(size=(6, len(GENES)))
    ids = [f"S{i}" for i in range(len(n_patches))]
    truth = {}
    for sid, n in zip(ids, n_patches):
        latent = rng.normal(size=(n, 6))
        emb = latent @ loading + 0.3 * rng.normal(size=(n, dim))
        barcodes = [f"{sid}_spot{k:04d}" for k in range(n)]
        rate = np.exp(0.4 * latent @ mixing + 1.0)
        counts = rng.poisson(rate).astype(np.float32)
        if constant_gene is not None:
            counts[:, GENES.index(constant_gene)] = 3.0
        # the h5ad: extra spots without a patch, a decoy gene, and rows/columns in another order
        extra = rng.poisson(2.0, size=(extra_spots, len(GENES))).astype(np.float32)
        obs = barcodes + [f"{sid}_nopatch{k}" for k in range(extra_spots)]
        X = np.concatenate([counts, extra])
        X = np.concatenate([X, rng.poisson(1.0, size=(len(obs), 1)).astype(np.float32)], axis=1)
        var = GENES + ["DECOY"]
        row_perm = rng.permutation(len(obs))
        col_perm = rng.permutation(len(var))
        adata = anndata.AnnData(
            X=X[row_perm][:, col_perm],
            obs=pd.DataFrame(index=[obs[i] for i in row_perm]),
            var=pd.DataFrame(index=[var[i] for i in col_perm]),
        )
        adata.write_h5ad(root / "adata" / f"{sid}.h5ad")
        coords = rng.integers(0, 10_000, size=(n, 2))
        with h5py.File(root / "patches" / f"{sid}.h5", "w") as f:
            size = 28 if images else 2
            f["img"] = rng.integers(0, 255, size=(n, size, size, 3), dtype=np.uint8)
            f["barcode"] = np.array([b.encode() for b in barcodes]).reshape(-1, 1)
            f["coords"] = coords
        hest.write_embeddings(emb_dir / f"{sid}.h5", emb, barcodes, coords)
        truth[sid] = (emb, np.log1p(counts.astype(np.float64)), extra_spots)
    for i, test_id in enumerate(ids):
        rows = lambda which: pd.DataFrame(  # noqa: E731
            {"sample_id": which, "patches_path": [f"patches/{s}.h5" for s in which], "expr_path": [f"adata/{s}.h5ad" for s in which]}
        )
        rows([s for s in ids if s != test_id]).to_csv(root / "splits" / f"train_{i}.csv", index=False)
        rows([test_id]).to_csv(root / "splits" / f"test_{i}.csv", index=False)
    return ids, truth, emb_dir


def _standardise_fp16(x, mean, std):
    """StandardScaler on float16 input as scikit-learn 1.9 does it: statistics accumulated in float64,
    then cast to float16, and the input centred and scaled in float16 (each step rounds to float16);
    PCA then takes the float16 result as float64."""
    mean16, std16 = mean.astype(np.float16), std.astype(np.float16)
    return ((x - mean16) / std16).astype(np.float64)


def _reference_fold(x_train, y_train, x_test, y_test, k, seed):
    """HEST's fold, transcribed independently (see the module docstring). The embeddings reach
    StandardScaler in the dtype their h5 holds (HEST casts nothing before sklearn)."""
    fp16 = x_train.dtype == np.float16
    x64 = x_train.astype(np.float64)
    mean = x64.mean(0)
    std = x64.std(0)
    if fp16:
        z_train, z_test = _standardise_fp16(x_train, mean, std), _standardise_fp16(x_test, mean, std)
    else:
        z_train = (x_train - mean) / std
        z_test = (x_test - mean) / std
    centre = z_train.mean(0)
    _, _, vt = np.linalg.svd(z_train - centre, full_matrices=False)
    # sklearn's sign convention (svd_flip on Vt): the largest |loading| of each component positive.
    # Signs do not change the exact ridge fit, but LSQR's float32 iterates and stopping step depend on them.
    vt = vt * np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(1)])[:, None]
    basis = vt[:k].T
    p_train = ((z_train - centre) @ basis).astype(np.float32)  # HEST: torch.Tensor, float32
    # LSQR in float32 stops after a few iterations (tol 1e-4), so BLAS summation order moves r by
    # ~1e-5. sklearn's fit_transform returns U * S, column-major, and HEST's torch.Tensor(...) keeps
    # those strides: the training matrix LSQR sees in HEST is column-major, so it is here.
    p_train = np.asfortranarray(p_train)
    p_test = ((z_test - centre) @ basis).astype(np.float32)
    alpha = 100 / (k * y_train.shape[1])
    preds = np.empty((len(p_test), y_train.shape[1]))
    for j in range(y_train.shape[1]):
        coef = lsqr(p_train, y_train[:, j].astype(np.float32), damp=np.sqrt(alpha), atol=1e-4, btol=1e-4, iter_lim=1000)[0]
        preds[:, j] = p_test @ coef.astype(np.float32)
    rs = []
    for j in range(y_train.shape[1]):
        a = y_test[:, j] - y_test[:, j].mean()
        b = preds[:, j] - preds[:, j].mean()
        rs.append(float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum())))
    return rs


def _reference_task(ids, truth):
    fold_means, per_gene = [], {g: [] for g in GENES}
    for test_id in ids:
        train = [truth[s] for s in ids if s != test_id]
        rs = _reference_fold(
            np.concatenate([t[0] for t in train]),
            np.concatenate([t[1] for t in train]),
            truth[test_id][0],
            truth[test_id][1],
            COMPONENTS,
            seed=1,
        )
        fold_means.append(np.mean(rs))
        for g, r in zip(GENES, rs):
            per_gene[g].append(r)
    return fold_means, per_gene


def test_scores_match_an_independent_transcription(tmp_path):
    ids, truth, emb_dir = _write_task(tmp_path / "IDC")
    out = tmp_path / "results"
    with warnings.catch_warnings():
        warnings.simplefilter("error", hest.HestWarning)
        result = hest.hest_benchmark(tmp_path / "IDC", embeddings=emb_dir, n_components=COMPONENTS, output_dir=out)
    fold_means, per_gene = _reference_task(ids, truth)
    # 1e-6: the reference differs only in float64 rounding (SVD vs sklearn's PCA, numpy vs scipy Pearson)
    np.testing.assert_allclose(result["mean_per_split"], fold_means, atol=1e-6, rtol=0)
    assert result["pearson_mean"] == pytest.approx(np.mean(fold_means), abs=1e-6)
    assert result["pearson_std"] == pytest.approx(np.std(fold_means), abs=1e-6)
    for item in result["pearson_corrs"]:
        np.testing.assert_allclose(item["pearson_corrs"], per_gene[item["name"]], atol=1e-6, rtol=0)
        assert item["mean"] == pytest.approx(np.mean(per_gene[item["name"]]), abs=1e-6)
    means = [item["mean"] for item in result["pearson_corrs"]]
    assert means == sorted(means, reverse=True)  # HEST sorts genes by mean, best first
    assert result["pearson_mean"] > 0.2  # the synthetic expression is predictable: not a trivial pass
    assert result["dropped_spots"] == {s: 5 for s in ids}
    assert "NOT" not in result["protocol"] or COMPONENTS != 256
    # HEST's files
    kfold = json.loads((out / "results_kfold.json").read_text())
    assert set(kfold) >= {"pearson_corrs", "pearson_mean", "pearson_std", "mean_per_split"}
    assert set(kfold["pearson_corrs"][0]) == {"name", "pearson_corrs", "mean", "std"}
    for i in range(3):
        fold = json.loads((out / f"split{i}" / "results.json").read_text())
        assert fold["pearson_mean"] == pytest.approx(fold_means[i], abs=1e-6)
        assert [d["name"] for d in fold["pearson_corrs"]] == GENES


@pytest.mark.skipif(
    tuple(int(p) for p in __import__("sklearn").__version__.split(".")[:2]) < (1, 9),
    reason="the float16 standardisation is transcribed against scikit-learn 1.9, whose StandardScaler.transform "
    "casts mean_ and scale_ to the input dtype; a release that subtracts the float64 statistics rounds elsewhere",
)
def test_float16_embeddings_reach_the_scaler_as_float16_as_in_hest(tmp_path):
    """HEST stores what the encoder returns (save_hdf5 keeps the dtype), reads it back as stored and
    hands it to StandardScaler uncast (benchmark.py, 0512f57a): float16 files are standardised in
    float16, not cast to float32 first."""
    ids, truth, emb_dir = _write_task(tmp_path / "T")
    half = {}
    for sid in ids:
        emb, barcodes, coords = hest.read_embeddings(emb_dir / f"{sid}.h5")
        hest.write_embeddings(emb_dir / f"{sid}.h5", emb.astype(np.float16), barcodes, coords)
        half[sid] = (emb.astype(np.float16),) + truth[sid][1:]
    assert hest.read_embeddings(emb_dir / f"{ids[0]}.h5")[0].dtype == np.float16
    result = hest.hest_benchmark(tmp_path / "T", embeddings=emb_dir, n_components=COMPONENTS)
    fold_means, _ = _reference_task(ids, half)
    np.testing.assert_allclose(result["mean_per_split"], fold_means, atol=1e-6, rtol=0)
    # casting the float16 values to float32 before the scaler would score measurably otherwise
    cast = {sid: (v[0].astype(np.float32),) + v[1:] for sid, v in half.items()}
    cast_means, _ = _reference_task(ids, cast)
    assert np.max(np.abs(np.array(cast_means) - fold_means)) > 1e-5


def test_closed_form_ridge_agrees_with_lsqr(tmp_path):
    """LSQR at HEST's tol 1e-4 vs the exact ridge solution: close, not identical (3e-3 stated)."""
    ids, truth, emb_dir = _write_task(tmp_path / "T")
    result = hest.hest_benchmark(tmp_path / "T", embeddings=emb_dir, n_components=COMPONENTS)
    x_train = np.concatenate([truth[s][0] for s in ids[1:]])
    y_train = np.concatenate([truth[s][1] for s in ids[1:]])
    z = (x_train - x_train.mean(0)) / x_train.std(0)
    _, _, vt = np.linalg.svd(z - z.mean(0), full_matrices=False)
    p = (z - z.mean(0)) @ vt[:COMPONENTS].T
    z_test = (truth[ids[0]][0] - x_train.mean(0)) / x_train.std(0)
    q = (z_test - z.mean(0)) @ vt[:COMPONENTS].T
    alpha = 100 / (COMPONENTS * len(GENES))
    w = np.linalg.solve(p.T @ p + alpha * np.eye(COMPONENTS), p.T @ y_train)
    pred = q @ w
    y = truth[ids[0]][1]
    exact = np.mean([np.corrcoef(y[:, j], pred[:, j])[0, 1] for j in range(len(GENES))])
    assert result["mean_per_split"][0] == pytest.approx(exact, abs=3e-3)


def test_embeds_with_h0mini_caches_and_resumes(tmp_path, monkeypatch):
    from tests.helpers import make_model

    _write_task(tmp_path / "T", n_patches=(12, 14, 13), extra_spots=2, images=True)
    model = make_model()
    out = tmp_path / "out"
    first = hest.hest_benchmark(tmp_path / "T", model, n_components=4, output_dir=out, batch_size=8, device="cpu", input_size=28)
    cached = sorted(p.name for p in (out / "embeddings").glob("*.h5"))
    assert cached == ["S0.h5", "S1.h5", "S2.h5"]
    emb, barcodes, coords = hest.read_embeddings(out / "embeddings" / "S1.h5")
    assert emb.shape[0] == 14 and len(barcodes) == 14 and coords.shape == (14, 2)
    assert barcodes[0] == "S1_spot0000"

    def refuse(*args, **kwargs):
        raise AssertionError("a cached sample was embedded again")

    monkeypatch.setattr(hest, "embed_patches", refuse)
    second = hest.hest_benchmark(tmp_path / "T", model, n_components=4, output_dir=out, input_size=28)
    assert second["mean_per_split"] == first["mean_per_split"]
    # another embedding, input size or model never reads this cache as its own
    for other in ({"embedding": "cls+mean", "input_size": 28}, {"input_size": 56}):
        with pytest.raises(EvaluationInputError, match=r"sample S\d: the cached embeddings .* were made with"):
            hest.hest_benchmark(tmp_path / "T", model, n_components=4, output_dir=out, **other)
    import torch

    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # fine-tuned further
    with pytest.raises(EvaluationInputError, match="were made with"):
        hest.hest_benchmark(tmp_path / "T", model, n_components=4, output_dir=out, input_size=28)


def test_weights_named_by_a_path_are_cached_by_their_content_not_their_name(tmp_path):
    from tests.helpers import write_checkpoint

    _write_task(tmp_path / "T", n_patches=(12, 14, 13), extra_spots=2, images=True)
    weights, out = tmp_path / "weights", tmp_path / "out"
    write_checkpoint(weights, seed=0)
    options = dict(n_components=4, output_dir=out, batch_size=8, device="cpu", input_size=28)
    first = hest.hest_benchmark(tmp_path / "T", weights, **options)
    assert hest.hest_benchmark(tmp_path / "T", weights, **options) == first  # from the cache
    write_checkpoint(weights, seed=1)  # the same folder, retrained: the cache is not its embeddings
    with pytest.raises(EvaluationInputError, match="were made with"):
        hest.hest_benchmark(tmp_path / "T", weights, **options)


def test_a_loaded_model_changed_in_place_is_not_read_from_its_old_cache(tmp_path):
    import torch

    import h0mini
    from tests.helpers import write_checkpoint

    _write_task(tmp_path / "T", n_patches=(12, 14, 13), extra_spots=2, images=True)
    write_checkpoint(tmp_path / "weights", seed=0)
    options = dict(n_components=4, output_dir=tmp_path / "out", batch_size=8, device="cpu", input_size=28)
    model = h0mini.load_model(tmp_path / "weights")
    first = hest.hest_benchmark(tmp_path / "T", model, **options)
    assert hest.hest_benchmark(tmp_path / "T", model, **options) == first  # from the cache
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # fine-tuned further: still the same weights file's provenance
    with pytest.raises(EvaluationInputError, match="were made with"):
        hest.hest_benchmark(tmp_path / "T", model, **options)
    with pytest.raises(EvaluationInputError, match="were made with"):  # cast: other numbers too
        hest.hest_benchmark(tmp_path / "T", h0mini.load_model(tmp_path / "weights", dtype=torch.bfloat16),
                            **options)


def test_missing_barcode_and_gene_are_named(tmp_path):
    ids, truth, emb_dir = _write_task(tmp_path / "T")
    emb, barcodes, coords = hest.read_embeddings(emb_dir / "S1.h5")
    barcodes[3] = "S1_ghost"
    hest.write_embeddings(emb_dir / "S1.h5", emb, barcodes, coords)
    with pytest.raises(EvaluationInputError, match=r"sample S1: 1 patch barcode.*S1_ghost"):
        hest.hest_benchmark(tmp_path / "T", embeddings=emb_dir, n_components=COMPONENTS)

    ids, truth, emb_dir = _write_task(tmp_path / "G")
    (tmp_path / "G" / "var_50genes.json").write_text(json.dumps({"genes": GENES + ["NOTAGENE"]}))
    with pytest.raises(EvaluationInputError, match=r"sample S\d: gene\(s\) \['NOTAGENE'\]"):
        hest.hest_benchmark(tmp_path / "G", embeddings=emb_dir, n_components=COMPONENTS)


def test_fold_smaller_than_pca_is_named(tmp_path):
    _, _, emb_dir = _write_task(tmp_path / "T")
    with pytest.raises(EvaluationInputError, match=r"T fold 0 .*PCA\(256\) needs at least 256 training spots"):
        hest.hest_benchmark(tmp_path / "T", embeddings=emb_dir)


def test_constant_gene_warns_with_its_name(tmp_path):
    _, _, emb_dir = _write_task(tmp_path / "T", constant_gene="ACTB")
    with pytest.warns(hest.HestWarning, match=r"fold \d \(test: S\d\): gene ACTB is constant"):
        result = hest.hest_benchmark(tmp_path / "T", embeddings=emb_dir, n_components=COMPONENTS)
    assert np.isnan(result["pearson_mean"])  # as HEST: the NaN propagates into the mean


def test_tuned_and_raw_tracks_are_labelled(tmp_path):
    _, _, emb_dir = _write_task(tmp_path / "T")
    official = hest.hest_benchmark(tmp_path / "T", embeddings=emb_dir, n_components=COMPONENTS)
    tuned = hest.hest_benchmark(tmp_path / "T", embeddings=emb_dir, n_components=COMPONENTS, alpha="cv")
    raw = hest.hest_benchmark(tmp_path / "T", embeddings=emb_dir, dimreduce=None)
    assert "NOT the leaderboard" in tuned["protocol"] and "inner 5-fold CV" in tuned["protocol"]
    assert "NOT the leaderboard" in raw["protocol"] and "no PCA" in raw["protocol"]
    assert all(f["alpha"] in hest.CV_ALPHAS for f in tuned["folds"])
    assert official["folds"][0]["alpha"] == pytest.approx(100 / (COMPONENTS * len(GENES)))
    assert raw["folds"][0]["alpha"] == pytest.approx(100 / (DIM * len(GENES)))


def test_leaderboard_row_follows_hest_order():
    columns, values = hest.leaderboard_row({"LYMPH_IDC": 0.2, "IDC": 0.6, "mine": 0.1, "CCRCC": 0.3})
    assert columns == ["Mean of 4 tasks", "IDC", "CCRCC", "LYMPH_IDC", "mine"]  # not the leaderboard's Average
    full, _ = hest.leaderboard_row({t: 0.5 for t in hest.HEST_TASKS})
    assert full[0] == "Average"
    assert values == pytest.approx([0.3, 0.6, 0.3, 0.2, 0.1])
    assert hest.HEST_TASKS == ("IDC", "PRAD", "PAAD", "SKCM", "COAD", "READ", "CCRCC", "LUNG", "LYMPH_IDC")
