"""load_model() and `h0mini download` through the real huggingface_hub code paths, network blocked.

A FakeHub on 127.0.0.1 speaks the Hub's file protocol; the cache, token and endpoint are
private to each test (see conftest.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import h0mini
from h0mini import errors
from h0mini.cli import main as cli_main
from fake_hub import FakeHub, FakeRepo
from helpers import checkpoint_files, make_model, write_checkpoint

REPO = "test-org/h0mini-tiny"
X = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))


def same_outputs(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    with torch.inference_mode():
        return torch.equal(a(X), b(X))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    model = write_checkpoint(folder)
    return folder, model


@pytest.fixture
def hub(tiny_folder, point_hub_at):
    folder, _ = tiny_folder
    with FakeHub() as server:
        server.repos[REPO] = FakeRepo(files=checkpoint_files(folder), branches={"v1": "b" * 40})
        server.repos["bioptimus/H0-mini"] = FakeRepo(files=checkpoint_files(folder), gated=True, token="hf_granted")
        server.repos["test-org/gated-tiny"] = FakeRepo(files=checkpoint_files(folder), gated=True, token="hf_granted")
        point_hub_at(server.url)
        yield server


# -- local weights ---------------------------------------------------------------------------


def test_loads_a_local_folder_in_the_hub_layout(tiny_folder):
    folder, original = tiny_folder
    model = h0mini.load_model(folder)
    assert not model.training
    assert same_outputs(model, original)
    assert model.h0mini_weights.arch == "h0mini_test"
    assert model.h0mini_weights.sha256 == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def test_loads_single_weight_files(tmp_path, tiny_folder):
    folder, original = tiny_folder
    model = h0mini.load_model(folder / "model.safetensors", arch="h0mini_test")
    assert same_outputs(model, original)
    torch.save(original.state_dict(), tmp_path / "weights.pth")
    assert same_outputs(h0mini.load_model(tmp_path / "weights.pth", arch="h0mini_test"), original)


def test_device_and_dtype_are_applied(tiny_folder):
    model = h0mini.load_model(tiny_folder[0], device="cpu", dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_pickled_code_is_refused(tmp_path):
    torch.save({"patch_embed.proj.weight": torch.zeros(1), "evil": Path("/")}, tmp_path / "weights.bin")
    with pytest.raises(errors.IncompatibleCheckpointError, match="weights.bin"):
        h0mini.load_model(tmp_path / "weights.bin", arch="h0mini_test")


def test_missing_path_is_named(tmp_path):
    with pytest.raises(errors.ModelNotFoundError, match="nowhere") as info:
        h0mini.load_model(tmp_path / "nowhere")
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(errors.ModelNotFoundError, match="holds no weights file"):
        h0mini.load_model(tmp_path)


def test_incompatible_checkpoint_lists_keys_and_names_the_cause(tmp_path, tiny_folder):
    with pytest.raises(errors.IncompatibleCheckpointError) as info:
        h0mini.load_model(tiny_folder[0] / "model.safetensors", arch="h0_mini")
    message = str(info.value)
    assert "shape mismatches" in message and "patch_embed.proj.weight" in message
    assert "another model" in message

    # A plain-MLP ViT of the same width: only the MLP shapes differ, so the SwiGLU hint is given.
    plain = timm.create_model("vit_base_patch14_reg4_dinov2", img_size=224, num_classes=0, mlp_ratio=4.0)
    save_file(plain.state_dict(), str(tmp_path / "plain.safetensors"))
    with pytest.raises(errors.IncompatibleCheckpointError, match="SwiGLU"):
        h0mini.load_model(tmp_path / "plain.safetensors", arch="h0_mini")


def test_base_timm_architecture_in_config_gets_the_swiglu_arguments(tmp_path):
    """The real Hub config names the timm base architecture; the SwiGLU layers must be added as the card does."""
    model = make_model("h0mini_test")
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    config = {
        "architecture": "vit_base_patch14_reg4_dinov2",
        "num_classes": 0,
        "model_args": {"img_size": 224, "embed_dim": 48, "depth": 2, "num_heads": 4, "mlp_ratio": 5.33334,
                       "init_values": 1e-5, "global_pool": ""},
        "pretrained_cfg": {"mean": [0.707223, 0.578729, 0.703617], "std": [0.211883, 0.230117, 0.177517],
                           "interpolation": "bicubic", "crop_pct": 1.0, "input_size": [3, 224, 224]},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = h0mini.load_model(tmp_path)
    assert same_outputs(loaded, model)
    assert loaded.pretrained_cfg["mean"] == config["pretrained_cfg"]["mean"]


def test_bioptimus_repos_always_get_the_swiglu_architecture():
    """Whatever the Hub config.json names, the Bioptimus repos are built with h0mini's registered archs."""
    from h0mini.hub import Checkpoint
    from h0mini.model import architecture_for

    config = {"architecture": "vit_base_patch14_reg4_dinov2", "model_args": {"img_size": 224}, "pretrained_cfg": {}}
    for repo, arch in (("bioptimus/H0-mini", "h0_mini"), ("bioptimus/H-optimus-0", "h_optimus_0")):
        name, _, cfg = architecture_for(Checkpoint(Path("model.safetensors"), config, "hub", repo_id=repo))
        assert name == arch and cfg["hf_hub_id"] == repo


# -- the Hub, through a local server ----------------------------------------------------------


def test_downloads_from_the_hub_then_loads_offline_from_the_cache(hub, tiny_folder, monkeypatch):
    model = h0mini.load_model(REPO)
    assert same_outputs(model, tiny_folder[1])
    assert model.h0mini_weights.repo_id == REPO and model.h0mini_weights.revision == "a" * 40
    assert all(auth is None for _, _, auth in hub.requests)

    hub.requests.clear()
    from huggingface_hub import constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    assert same_outputs(h0mini.load_model(REPO), tiny_folder[1])
    assert hub.requests == []


def test_revision_pins_config_and_weights_to_one_commit(hub):
    model = h0mini.load_model(REPO, revision="v1")
    assert model.h0mini_weights.revision == "b" * 40
    weights_requests = [path for _, path, _ in hub.requests if path.endswith("model.safetensors")]
    assert weights_requests and all("/resolve/" + "b" * 40 + "/" in path for path in weights_requests)


def test_gated_repo_without_token_says_where_to_ask_and_how_to_pass_one(hub):
    with pytest.raises(errors.GatedModelError) as info:
        h0mini.load_model()
    message = str(info.value)
    assert "https://huggingface.co/bioptimus/H0-mini" in message
    assert "HF_TOKEN" in message and "token=" in message and "No token was sent" in message
    assert isinstance(info.value, PermissionError)


def test_gated_repo_with_a_refused_token_never_shows_the_token(hub):
    with pytest.raises(errors.GatedModelError) as info:
        h0mini.load_model(token="hf_secret_not_granted")
    assert "refused" in str(info.value) and "hf_secret_not_granted" not in str(info.value)
    assert ("GET", "/bioptimus/H0-mini/resolve/main/config.json", "Bearer hf_secret_not_granted") in hub.requests or any(
        auth == "Bearer hf_secret_not_granted" for _, _, auth in hub.requests
    )


def test_gated_repo_with_a_granted_token_loads(hub, tiny_folder, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_granted")
    assert same_outputs(h0mini.load_model("test-org/gated-tiny"), tiny_folder[1])
    assert any(auth == "Bearer hf_granted" for _, _, auth in hub.requests)


def test_unknown_repo_and_revision_are_named(hub):
    with pytest.raises(errors.ModelNotFoundError, match="'test-org/nope' was not found"):
        h0mini.load_model("test-org/nope")
    with pytest.raises(errors.RevisionNotFoundError, match="'v9' does not exist in 'test-org/h0mini-tiny'"):
        h0mini.load_model(REPO, revision="v9")


def test_offline_with_nothing_cached_names_the_way_out(monkeypatch):
    from huggingface_hub import constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(errors.WeightsNotCachedError) as info:
        h0mini.load_model(REPO)
    assert "HF_HUB_OFFLINE=1" in str(info.value) and "h0mini download" in str(info.value)
    with pytest.raises(errors.WeightsNotCachedError, match="local_files_only=True"):
        h0mini.load_model(REPO, local_files_only=True)


def test_no_network_with_nothing_cached_is_the_same_clear_error(monkeypatch):
    # The autouse fixture points the Hub at a closed local port. huggingface_hub would retry the
    # refused connection with back-off (about 23 s); h0mini classifies its first failure instead.
    import time

    monkeypatch.setattr(time, "sleep", lambda seconds: pytest.fail("huggingface_hub retried"))
    with pytest.raises(errors.WeightsNotCachedError, match="127.0.0.1:9 refused the connection"):
        h0mini.load_model(REPO)


def test_a_hand_copied_cache_loads_offline(isolated_hub, tiny_folder, monkeypatch):
    """The standard cache layout (blobs, snapshots/<commit>, refs/main), as copied from another machine."""
    folder, original = tiny_folder
    commit = "c" * 40
    repo_dir = isolated_hub / "models--test-org--h0mini-tiny"
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo_dir / "blobs").mkdir()
    for name, data in checkpoint_files(folder).items():
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / name)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    from huggingface_hub import constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    model = h0mini.load_model(REPO)
    assert same_outputs(model, original) and model.h0mini_weights.revision == commit


def test_timm_create_model_pretrained_needs_no_extra_arguments(tmp_path, point_hub_at):
    """`timm.create_model("h0_mini", pretrained=True)` resolves bioptimus/H0-mini through HF_ENDPOINT."""
    original = write_checkpoint(tmp_path / "full", arch="h0_mini")
    with FakeHub() as server:
        server.repos["bioptimus/H0-mini"] = FakeRepo(files=checkpoint_files(tmp_path / "full"))
        point_hub_at(server.url)
        model = timm.create_model("h0_mini", pretrained=True).eval()
    assert same_outputs(model, original)


# -- `h0mini download` --------------------------------------------------------------------------


def test_download_command_prints_commit_and_sha256_then_the_folder_loads(hub, tmp_path, capsys, tiny_folder):
    assert cli_main(["download", REPO, "--revision", "v1", "--local-dir", str(tmp_path / "local")]) == 0
    out = capsys.readouterr().out
    sha = hashlib.sha256((tiny_folder[0] / "model.safetensors").read_bytes()).hexdigest()
    assert f"revision: {'b' * 40}" in out and f"sha256:   {sha}" in out
    assert same_outputs(h0mini.load_model(tmp_path / "local"), tiny_folder[1])


def test_download_into_the_cache_then_load_offline(hub, tiny_folder, monkeypatch, capsys):
    """The documented offline workflow: `h0mini download`, then HF_HUB_OFFLINE=1 on the same cache."""
    assert cli_main(["download", REPO]) == 0
    assert cli_main(["download", REPO, "--revision", "v1"]) == 0
    from huggingface_hub import constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    hub.requests.clear()
    assert same_outputs(h0mini.load_model(REPO), tiny_folder[1])
    assert h0mini.load_model(REPO, revision="v1").h0mini_weights.revision == "b" * 40
    assert h0mini.load_model("hf-hub:" + REPO).h0mini_weights.repo_id == REPO  # the model card's spelling
    assert hub.requests == []


def test_download_command_reports_gated_access_in_one_line(hub, capsys):
    assert cli_main(["download"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: Access to 'bioptimus/H0-mini' is gated") and err.count("\n") == 1
    assert "Traceback" not in err


def test_download_command_honours_hf_endpoint_from_the_environment(hub, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "home"), HF_HUB_DISABLE_TELEMETRY="1")
    result = subprocess.run(
        [sys.executable, "-m", "h0mini", "download", REPO], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert f"revision: {'a' * 40}" in result.stdout
    assert str(tmp_path / "home" / "hub") in result.stdout


def test_a_downloaded_folder_builds_what_the_repo_id_builds(hub, tmp_path, tiny_folder):
    import json

    local = tmp_path / "local"
    assert cli_main(["download", REPO, "--revision", "v1", "--local-dir", str(local)]) == 0
    record = json.loads((local / "h0mini_source.json").read_text())
    assert (record["repo_id"], record["revision"], record["weights_file"]) == (REPO, "b" * 40, "model.safetensors")
    from_folder = h0mini.load_model(local)
    from_repo = h0mini.load_model(REPO, revision="v1")
    assert from_folder.h0mini_weights.repo_id == REPO and from_folder.h0mini_weights.revision == "b" * 40
    assert from_folder.h0mini_weights.arch == from_repo.h0mini_weights.arch
    assert from_folder.pretrained_cfg.get("hf_hub_id") == from_repo.pretrained_cfg.get("hf_hub_id") == REPO
    assert same_outputs(from_folder, from_repo)


def test_a_revision_can_ride_on_the_repo_id(hub):
    assert h0mini.load_model(f"{REPO}@v1").h0mini_weights.revision == "b" * 40
    assert h0mini.load_model(f"hf-hub:{REPO}@v1").h0mini_weights.revision == "b" * 40  # timm's spelling
    with pytest.raises(errors.InvalidArgumentError, match="was also given"):
        h0mini.load_model(f"{REPO}@v1", revision="main")


def test_download_offline_says_what_to_do_without_a_weights_option_it_lacks(capsys, monkeypatch):
    import time

    monkeypatch.setattr(time, "sleep", lambda seconds: pytest.fail("huggingface_hub retried"))
    assert cli_main(["download", REPO]) == 1  # the autouse fixture's Hub is a closed local port
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refused the connection" in err
    assert "Run `h0mini download` on a machine with internet access" in err
    assert "pass a local folder: --weights" not in err and "to the other commands as --weights DIR" in err
