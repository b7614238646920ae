"""Hub model cards (README.md) for checkpoints of the H0-mini family.

:func:`render_model_card` is a pure function: provenance in, Markdown out, no I/O. The
``h0mini card`` command and the distillation export both call it.
"""

from __future__ import annotations

import json
from pathlib import PurePath
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

from .constants import (
    CROP_PCT,
    H0_MINI_REPO_ID,
    H_OPTIMUS_0_REPO_ID,
    INTERPOLATION,
    MEAN,
    MICRONS_PER_PIXEL,
    NUM_REGISTERS,
    PATCH_SIZE,
    STD,
    TILE_SIZE,
)
from .version import __version__

PAPER_URL = "https://arxiv.org/abs/2501.16239"
DEFAULT_TAGS = ("h0mini", "timm", "pathology", "histology", "vision-transformer", "image-feature-extraction")
PROVENANCE_FIELDS = ("weights", "arch", "repo_id", "revision", "weights_file", "weights_sha256")

_REPO_LICENCES = {H0_MINI_REPO_ID.lower(): "cc-by-nc-nd-4.0", H_OPTIMUS_0_REPO_ID.lower(): "apache-2.0"}

_CITATION = """@inproceedings{filiot2025distilling,
  title     = {Distilling foundation models for robust and efficient models in digital pathology},
  author    = {Filiot, Alexandre and others},
  booktitle = {Medical Image Computing and Computer Assisted Intervention (MICCAI)},
  year      = {2025},
  note      = {arXiv:2501.16239}
}"""


def render_model_card(
    weights: Mapping[str, Any],
    training: Optional[Mapping[str, Any]] = None,
    *,
    repo_id: Optional[str] = None,
    license: Optional[str] = None,
    title: Optional[str] = None,
    description: Optional[str] = None,
    embed_dim: Optional[int] = None,
    preprocessing: Optional[Mapping[str, Any]] = None,
    tags: Sequence[str] = (),
    library_name: str = "timm",
    extra_sections: Optional[Mapping[str, str]] = None,
) -> str:
    """Render a Hub model card: YAML front matter, then usage, embeddings, preprocessing, provenance.

    Args:
        weights: provenance, as ``model.h0mini_weights.as_dict()`` returns it (keys ``weights``,
            ``arch``, ``repo_id``, ``revision``, ``weights_file``, ``weights_sha256``; missing ones
            are shown as unknown, extra ones are listed too).
        training: optional training summary (e.g. teacher, data, steps, final losses), shown as a
            table; nested mappings are flattened to ``a.b`` keys.
        repo_id: the Hub repo the card is for, used in the usage snippet. Default: the
            provenance's ``repo_id``, else a placeholder ``<user>/<repo>``.
        license: Hub licence id. Default: from the repo the weights came from (else ``repo_id``):
            ``cc-by-nc-nd-4.0`` for bioptimus/H0-mini, ``apache-2.0`` for bioptimus/H-optimus-0,
            else ``other``. The architecture alone decides nothing: a user's own ``h0_mini``
            weights (a distilled student) are not under H0-mini's licence.
        title: first heading. Default: the repo id or the architecture.
        description: a paragraph under the title. Default: one sentence naming the architecture.
        embed_dim: token width. Default: looked up from the architecture (768 for ``h0_mini``).
        preprocessing: ``input_size`` (int or ``[3, H, W]``), ``interpolation``, ``crop_pct``,
            ``mean``, ``std`` (e.g. the model's ``pretrained_cfg``). Default: H0-mini's.
        tags: added to the default tags (h0mini, timm, pathology, ...).
        library_name: the Hub ``library_name`` (default ``"timm"``: the folder is a timm checkpoint).
        extra_sections: more ``{heading: markdown}`` sections, placed after the training summary.

    Returns:
        The README.md text, ending with a newline.

    Example:
        >>> model = h0mini.load_model("./my-student")
        >>> text = render_model_card(model.h0mini_weights.as_dict(), {"teacher": "bioptimus/H-optimus-0"})
        >>> text.splitlines()[0]
        '---'
    """
    weights = dict(weights)
    arch = str(weights.get("arch") or "unknown")
    repo = repo_id or weights.get("repo_id") or "<user>/<repo>"
    licence = license or default_license(weights.get("repo_id") or repo_id)
    dim = embed_dim or _embed_dim(arch)
    prep = _preprocessing(preprocessing)
    size = prep["size"]
    grid = size // PATCH_SIZE
    all_tags = list(dict.fromkeys([*DEFAULT_TAGS, *tags]))

    front = ["---", f"license: {_yaml_scalar(licence)}", f"library_name: {_yaml_scalar(library_name)}",
             "pipeline_tag: image-feature-extraction", "tags:"]
    front += [f"- {_yaml_scalar(tag)}" for tag in all_tags]
    front.append("---")

    heading = title or (repo if repo != "<user>/<repo>" else f"{arch} (H0-mini family)")
    intro = description or (
        f"Vision transformer `{arch}` of the H0-mini family ([paper]({PAPER_URL})) for H&E pathology tiles: "
        f"patch {PATCH_SIZE}, {NUM_REGISTERS} register tokens"
        + (f", {dim}-d tokens" if dim else "")
        + ". It returns tile embeddings for downstream models (linear probes, slide-level aggregation, retrieval)."
    )

    def dim_text(k: int) -> str:
        return f"{k * dim}-d" if dim else f"{k} x the token width"

    sections: List[str] = [
        "\n".join(front),
        f"# {heading}",
        intro,
        "## Usage",
        "With h0mini (`pip install h0mini`):",
        "```python\nimport h0mini\n\n"
        f'model = h0mini.load_model("{repo}")\n'
        'features = h0mini.embed_tiles("tiles/", model)               # (N, '
        + (str(2 * dim) if dim else "2D")
        + "): CLS + mean of patch tokens\n"
        'patch_tokens = h0mini.embed_tiles("tiles/", model, embedding="patch_tokens")  # (N, '
        + f"{grid * grid}, {dim or 'D'})\n```",
        f"or from the command line: `h0mini embed tiles/ -o features.h5 --weights {repo}`.",
        "## Embeddings",
        f"For a {size} px tile the model returns {1 + NUM_REGISTERS + grid * grid} tokens: index 0 is the CLS token, "
        f"1-{NUM_REGISTERS} are register tokens, and the last {grid * grid} are the patch tokens of the "
        f"{grid} x {grid} grid of {PATCH_SIZE} px patches, row by row.\n\n"
        f"- `cls+mean` (default, the H0-mini model card's embedding): the CLS token concatenated with the mean of "
        f"the {grid * grid} patch tokens, {dim_text(2)}. Register tokens never enter the mean.\n"
        f"- `cls`: the CLS token alone, {dim_text(1)}, as the PLISM and eva benchmarks use.\n"
        f"- `patch_tokens`: ({grid * grid}, {dim or 'D'}) per tile, for dense tasks and patch-feature maps.",
        "## Preprocessing",
        f"- RGB tiles of {size} x {size} px at {MICRONS_PER_PIXEL} µm/px (20x); other sizes are resized "
        f"(shorter side to {round(size / prep['crop_pct'])} px, {prep['interpolation']}) and centre-cropped "
        f"to {size} px.\n"
        f"- Scaled to [0, 1], then normalised with mean {_floats(prep['mean'])} and std {_floats(prep['std'])} "
        f"({_normalisation_name(prep['mean'], prep['std'])}).\n"
        "- `h0mini.embed_tiles` does all of this itself; on CUDA it runs in float16 autocast.",
        "## Provenance of the weights",
        _table(("field", "value"), _provenance_rows(weights)),
        f"Card written by h0mini {__version__}.",
    ]
    if training:
        sections += ["## Training", _table(("item", "value"), list(_flatten(training)))]
    for name, body in (extra_sections or {}).items():
        sections += [f"## {name}", body.strip()]
    sections += ["## Licence", _licence_text(licence), "## Citation", f"```bibtex\n{_CITATION}\n```"]
    return "\n\n".join(s.strip("\n") for s in sections) + "\n"


def default_license(repo_id: Optional[str]) -> str:
    """Hub licence id for weights from ``repo_id``: see :func:`render_model_card`.

    Only the Bioptimus repos' licences are known; the architecture says nothing about whose
    weights these are.
    """
    return _REPO_LICENCES.get(str(repo_id or "").lower(), "other")


def _embed_dim(arch: str) -> Optional[int]:
    from .registry import ARCH_ARGS

    args = ARCH_ARGS.get(arch)
    return int(args["embed_dim"]) if args else None


def _preprocessing(given: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    given = dict(given or {})
    size = given.get("input_size", TILE_SIZE)
    if isinstance(size, (list, tuple)):
        size = size[-1]
    return {
        "size": int(size),
        "interpolation": str(given.get("interpolation") or INTERPOLATION),
        "crop_pct": float(given.get("crop_pct") or CROP_PCT),
        "mean": tuple(given.get("mean") or MEAN),
        "std": tuple(given.get("std") or STD),
    }


_IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _normalisation_name(mean: Sequence[float], std: Sequence[float]) -> str:
    """Name the values the weights were trained with, so a card never claims H-optimus-0's for others."""
    def same(a: Sequence[float], b: Sequence[float]) -> bool:
        return len(a) == len(b) and all(abs(x - y) < 1e-6 for x, y in zip(a, b))

    if same(mean, MEAN) and same(std, STD):
        return "the H-optimus-0 values, not ImageNet's"
    if same(mean, _IMAGENET_MEAN_STD[0]) and same(std, _IMAGENET_MEAN_STD[1]):
        return "ImageNet's values, not H-optimus-0's"
    return "the values these weights were trained with, neither H-optimus-0's nor ImageNet's"


def _provenance_rows(weights: Mapping[str, Any]) -> List[tuple]:
    labels = {"weights": "loaded from", "arch": "architecture", "repo_id": "Hub repo", "revision": "revision",
              "weights_file": "weights file", "weights_sha256": "sha256"}
    local = not weights.get("repo_id")
    rows = []
    for key in PROVENANCE_FIELDS:
        value = weights.get(key)
        if key == "weights" and value and local:
            value = f"{PurePath(str(value)).name} (local files)"  # the machine's own path means nothing on the Hub
        if key in ("repo_id", "revision") and not value and local:
            rows.append((labels[key], "none (local files)"))
            continue
        rows.append((labels[key], _code(value) if value else "unknown"))
    rows += [(str(k), _code(v)) for k, v in weights.items() if k not in PROVENANCE_FIELDS and v is not None]
    return rows


def _licence_text(licence: str) -> str:
    if licence == "cc-by-nc-nd-4.0":
        return (
            "These weights are under [CC-BY-NC-ND 4.0](https://creativecommons.org/licenses/by-nc-nd/4.0/): "
            "attribution, non-commercial use only, no redistribution of modified weights. H0-mini itself is "
            f"gated on the Hub ([{H0_MINI_REPO_ID}](https://huggingface.co/{H0_MINI_REPO_ID})); request access there "
            "rather than re-uploading it. The h0mini code is Apache-2.0."
        )
    if licence == "other":
        return ("Licence: see the terms of the data and of any teacher model these weights were trained from. "
                "The h0mini code is Apache-2.0.")
    return f"These weights are released under `{licence}`. The h0mini code is Apache-2.0."


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> Iterable[tuple]:
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _flatten(value, name + ".")
        else:
            yield name, _format(value)


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_format(v) for v in value)
    return str(value)


def _table(header: tuple, rows: Sequence[tuple]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {_cell(a)} | {_cell(b)} |" for a, b in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    return " ".join(str(value).split()).replace("|", "\\|")


def _code(value: Any) -> str:
    return f"`{value}`"


def _floats(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{float(v):g}" for v in values) + ")"


def _yaml_scalar(value: str) -> str:
    """A YAML scalar: bare when safe, else double-quoted (JSON strings are valid YAML)."""
    text = str(value)
    reserved = ("yes", "no", "true", "false", "null", "on", "off", "~")
    safe = bool(text) and all(c.isalnum() or c in "-_./" for c in text) and text[0] not in "-./" \
        and text.lower() not in reserved
    return text if safe and not _is_number(text) else json.dumps(text)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


__all__ = ["render_model_card", "default_license", "DEFAULT_TAGS"]
