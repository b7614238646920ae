"""Model cards: h0mini.card.render_model_card and the `h0mini card` command."""

from __future__ import annotations

import json
import re

import pytest

from h0mini.card import render_model_card
from h0mini.cli import main
from h0mini.model import file_sha256
from helpers import EXAMPLE_TILES, write_checkpoint

H0_MINI_PROVENANCE = {
    "weights": "bioptimus/H0-mini",
    "arch": "h0_mini",
    "repo_id": "bioptimus/H0-mini",
    "revision": "0123456789abcdef0123456789abcdef01234567",
    "weights_file": "model.safetensors",
    "weights_sha256": "ab" * 32,
}


def front_matter(text: str) -> dict:
    yaml = pytest.importorskip("yaml")
    match = re.match(r"---\n(.*?)\n---\n", text, re.S)
    assert match, "the card must start with YAML front matter"
    return yaml.safe_load(match.group(1))


def code_blocks(text: str, language: str) -> list:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / "tiny-student"
    write_checkpoint(folder)
    return folder


def test_card_for_h0_mini_has_hub_metadata_usage_embedding_and_provenance():
    text = render_model_card(H0_MINI_PROVENANCE)
    meta = front_matter(text)
    assert meta["license"] == "cc-by-nc-nd-4.0"
    assert meta["library_name"] == "timm"
    assert meta["pipeline_tag"] == "image-feature-extraction"
    assert {"h0mini", "pathology", "timm"} <= set(meta["tags"])
    assert "# bioptimus/H0-mini" in text
    (snippet,) = code_blocks(text, "python")
    compile(snippet, "card-snippet", "exec")
    assert 'h0mini.load_model("bioptimus/H0-mini")' in snippet and "(N, 1536)" in snippet
    assert "(N, 256, 768)" in snippet
    assert "1536-d" in text and "Register tokens never enter the mean" in text
    assert "0.707223" in text and "0.211883" in text and "bicubic" in text and "0.5 µm/px" in text
    assert H0_MINI_PROVENANCE["revision"] in text and H0_MINI_PROVENANCE["weights_sha256"] in text
    assert "non-commercial" in text
    assert text.endswith("\n") and "\n\n\n" not in text


def test_training_summary_options_and_quoting():
    text = render_model_card(
        {"weights": "/home/me/runs/student", "arch": "h0_mini", "weights_file": "model.safetensors"},
        {"teacher": "bioptimus/H-optimus-0", "steps": 1000, "loss": {"final": 0.123456}, "crops": [224, 98]},
        repo_id="me/student",
        license="apache-2.0",
        tags=["distilled", "h0mini", "2025"],
        extra_sections={"Evaluation": "PLISM score 0.5 | see table"},
    )
    meta = front_matter(text)
    assert meta["license"] == "apache-2.0"
    assert meta["tags"].count("h0mini") == 1 and "distilled" in meta["tags"] and "2025" in meta["tags"]
    assert "| teacher | bioptimus/H-optimus-0 |" in text
    assert "| loss.final | 0.1235 |" in text and "| crops | 224, 98 |" in text
    assert "## Evaluation\n\nPLISM score 0.5 | see table" in text
    assert "/home/me" not in text, "a local path of the machine that wrote the card must not leak"
    assert "`student (local files)`" in text and "none (local files)" in text
    assert "unknown" in text  # no sha256 given
    assert 'load_model("me/student")' in text


def test_licence_follows_the_weights_repo_not_the_architecture():
    # A user's own h0_mini-architecture weights (e.g. a distilled student) are not Bioptimus's H0-mini.
    own = {"weights": "/runs/student", "arch": "h0_mini", "weights_file": "model.safetensors", "weights_sha256": "cd" * 32}
    text = render_model_card(own, repo_id="me/student")
    assert front_matter(text)["license"] == "other"
    assert "gated" not in text and "CC-BY-NC-ND" not in text
    copy = render_model_card({**own, "repo_id": None}, repo_id="bioptimus/H0-mini")
    assert front_matter(copy)["license"] == "cc-by-nc-nd-4.0"  # a card for the H0-mini repo itself
    text = render_model_card(H0_MINI_PROVENANCE, repo_id="me/h0-mini-mirror")
    assert front_matter(text)["license"] == "cc-by-nc-nd-4.0" and "gated" in text
    optimus = {"arch": "h_optimus_0", "repo_id": "bioptimus/H-optimus-0"}
    assert front_matter(render_model_card(optimus))["license"] == "apache-2.0"
    assert front_matter(render_model_card({"arch": "h_optimus_0"}))["license"] == "other"


def test_unknown_architecture_and_no_repo_still_render():
    text = render_model_card({"arch": "vit_custom"})
    assert front_matter(text)["license"] == "other"
    assert 'load_model("<user>/<repo>")' in text
    assert "(N, 2D)" in text


def test_cli_writes_a_card_for_a_local_checkpoint(checkpoint, tmp_path, capsys):
    training = tmp_path / "training.json"
    training.write_text(json.dumps({"teacher": "h0mini_test", "steps": 3}))
    out = tmp_path / "card" / "README.md"
    code = main(["card", "--weights", str(checkpoint), "-o", str(out), "--repo-id", "me/tiny",
                 "--training", str(training)])
    assert code == 0
    assert str(out) in capsys.readouterr().out
    text = out.read_text()
    assert front_matter(text)["license"] == "other"
    assert file_sha256(checkpoint / "model.safetensors") in text
    assert "`h0mini_test`" in text and "(N, 96)" in text and "| steps | 3 |" in text
    assert str(checkpoint) not in text

    assert main(["card", "--weights", str(checkpoint), "-o", str(out)]) == 2  # no silent overwrite: a usage error
    assert "--force" in capsys.readouterr().err
    assert main(["card", "--weights", str(checkpoint), "-o", str(out), "--force", "--license", "mit"]) == 0
    assert front_matter(out.read_text())["license"] == "mit"


def test_cli_prints_to_stdout_by_default(checkpoint, capsys):
    assert main(["card", "--weights", str(checkpoint)]) == 0
    assert capsys.readouterr().out.startswith("---\nlicense: other\n")


def test_cli_bad_training_file_is_a_usage_error(checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(SystemExit) as exit_info:
        main(["card", "--weights", str(checkpoint), "--training", str(bad)])
    assert exit_info.value.code == 2 and "JSON object" in capsys.readouterr().err


def test_cli_without_weights_gives_the_same_message_as_embed(tmp_path, capsys):
    """No local checkpoint and no Hub (the suite blocks it): the card command fails like every command."""
    assert main(["card", "--offline"]) == 1
    card_error = capsys.readouterr().err
    assert main(["embed", str(EXAMPLE_TILES[0]), "-o", str(tmp_path / "f.npy"), "--offline"]) == 1
    embed_error = capsys.readouterr().err
    assert card_error == embed_error
    assert card_error.startswith("error: ") and "bioptimus/H0-mini" in card_error
