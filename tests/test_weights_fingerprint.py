"""weights_fingerprint: the key caches and resumes use to tell one model's numbers from another's."""

from __future__ import annotations

import copy
import hashlib

import torch

import h0mini
from helpers import make_model, write_checkpoint


def test_a_loaded_model_is_named_by_its_weights_file(tmp_path):
    write_checkpoint(tmp_path)
    model = h0mini.load_model(tmp_path)
    expected = hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()
    assert h0mini.weights_fingerprint(model) == expected
    assert h0mini.weights_fingerprint(model, state=True) == h0mini.weights_fingerprint(copy.deepcopy(model), state=True)
    assert h0mini.weights_fingerprint(model, state=True).startswith("state:")


def test_an_in_memory_model_is_named_by_its_state_and_any_changed_weight_changes_it():
    model = make_model("h0mini_test", 0)
    same = copy.deepcopy(model)
    fingerprint = h0mini.weights_fingerprint(model)
    assert fingerprint.startswith("state:") and h0mini.weights_fingerprint(same) == fingerprint
    with torch.no_grad():
        same.blocks[0].attn.qkv.weight[0, 0] += 1e-6  # one number, far below any printout
    assert h0mini.weights_fingerprint(same) != fingerprint
    assert h0mini.weights_fingerprint(make_model("h0mini_test", 0).to(torch.bfloat16)) != fingerprint  # dtype counts
