"""h0mini.runtime: the attention kernel per device and dtype, and torch.compile that stays correct."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
import torch
import torch._inductor.exc
import torch.nn.functional as F

import h0mini
from h0mini.runtime import ModelForward, prefers_explicit_attention
from helpers import make_model, slide_tiles


@pytest.fixture(scope="module")
def tiles():
    return [t for _, t in slide_tiles()[:5]]


def count_fused_attention_calls(monkeypatch) -> list:
    calls = []
    original = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    return calls


def test_bf16_on_cpu_uses_explicit_attention_and_leaves_the_model_as_it_was(monkeypatch, tiles):
    model = make_model()
    calls = count_fused_attention_calls(monkeypatch)
    bf16 = h0mini.embed_tiles(tiles, model, precision="bf16", device="cpu")
    assert calls == []  # timm's q @ k.T path: faster than the fused CPU kernel in bf16
    assert all(block.attn.fused_attn for block in model.blocks)  # the user's model is untouched

    fp32 = h0mini.embed_tiles(tiles, model, precision="fp32", device="cpu")
    assert len(calls) == len(model.blocks)  # fp32 keeps the fused kernel, faster there
    cos = (bf16 * fp32).sum(-1) / np.linalg.norm(bf16, axis=-1) / np.linalg.norm(fp32, axis=-1)
    assert cos.min() > 0.999  # the parity bar for a default precision


def test_kernel_choice_by_device_and_dtype():
    assert prefers_explicit_attention(torch.device("cpu"), torch.bfloat16)
    assert not prefers_explicit_attention(torch.device("cpu"), None)
    assert not prefers_explicit_attention(torch.device("cpu"), torch.float32)
    assert not prefers_explicit_attention(torch.device("cuda"), torch.bfloat16)
    assert not prefers_explicit_attention(torch.device("cuda"), torch.float16)


def test_explicit_attention_is_restored_after_an_error():
    model = make_model()
    forward = ModelForward(model, torch.device("cpu"), torch.bfloat16)
    with pytest.raises(RuntimeError):
        forward(torch.zeros(1, 5, 224, 224))  # wrong channel count fails inside the model
    assert all(block.attn.fused_attn for block in model.blocks)


needs_cxx = pytest.mark.skipif(
    not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")),
    reason="torch.compile on CPU needs a C++ compiler",
)


@needs_cxx
def test_compile_matches_eager_pads_the_last_batch_and_follows_weight_changes(tiles):
    """fp32, tiny model: compiled and eager differ only by inductor's fused summation order, so
    1e-4 on values of order 1. The frozen graph must not keep old weights after an in-place update."""
    model = make_model()
    eager = h0mini.embed_tiles(tiles, model, precision="fp32", batch_size=2)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = h0mini.embed_tiles(tiles, model, precision="fp32", batch_size=2, compile=True)  # 2 + 2 + 1 padded
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1  # the short batch reused it
    assert compiled.shape == eager.shape == (5, 96)
    assert np.abs(compiled - eager).max() < 1e-4

    embedder = h0mini.TileEmbedder(model, precision="fp32", batch_size=2, compile=True)
    for update in (lambda w: w.mul_(1.5), lambda w: w.data.mul_(1.5)):  # the second leaves no version trace
        with torch.no_grad():
            for block in model.blocks:
                update(block.attn.qkv.weight)  # as fine-tuning or an EMA between two calls would
        eager_after = h0mini.embed_tiles(tiles, model, precision="fp32", batch_size=2)
        compiled_after = np.concatenate([b.features["cls+mean"].numpy() for b in embedder.iter_batches(tiles)])
        assert np.abs(eager_after - eager).max() > 1e-2  # the change matters
        assert np.abs(compiled_after - eager_after).max() < 1e-4  # linear weights are frozen: they were refreshed


@needs_cxx
def test_compile_works_on_a_model_built_in_inference_mode(tiles):
    with torch.inference_mode():
        model = make_model()  # inference tensors: no version counters to read
    eager = h0mini.embed_tiles(tiles[:2], model, precision="fp32")
    compiled = h0mini.embed_tiles(tiles[:2], model, precision="fp32", compile=True)
    assert np.abs(compiled - eager).max() < 1e-4


def test_an_error_of_the_model_itself_is_not_taken_for_a_compiler_failure():
    forward = ModelForward(make_model(), torch.device("cpu"), None, compile=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "torch.compile failed on this machine"
        with pytest.raises(RuntimeError):
            forward(torch.zeros(1, 5, 224, 224))  # 5 channels: the patch embedding refuses them
    assert forward.compiled is not None and not forward.compiled.failed


@needs_cxx
def test_compiled_bf16_on_cpu_stays_at_the_parity_bar(tiles):
    """The CPU default precision, compiled (frozen, pre-packed bf16 weights) against fp32 eager."""
    model = make_model()
    fp32 = h0mini.embed_tiles(tiles, model, precision="fp32")
    compiled = h0mini.embed_tiles(tiles, model, precision="bf16", compile=True)
    cos = (compiled * fp32).sum(-1) / np.linalg.norm(compiled, axis=-1) / np.linalg.norm(fp32, axis=-1)
    assert cos.min() > 0.999


def test_a_compiler_failure_warns_and_falls_back_to_eager(monkeypatch, tiles):
    model = make_model()

    def broken_compile(fn, **kwargs):
        def run(x):
            raise torch._inductor.exc.InvalidCxxCompiler()
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    eager = h0mini.embed_tiles(tiles, model, precision="fp32", batch_size=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fallback = h0mini.embed_tiles(tiles, model, precision="fp32", batch_size=2, compile=True)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "continuing without compile" in messages[0]
    np.testing.assert_array_equal(fallback, eager)
