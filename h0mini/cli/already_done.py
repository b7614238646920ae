"""``h0mini embed`` run again with nothing left to do: decided before the model loads.

The existing output counts as done when it holds exactly the requested tiles, in order, and
the numbers it records (the resume key of ``h0mini.job``: weights, architecture, embedding,
precision, weights dtype, preprocessing) are those this run would produce. The weights are
identified without loading them: a Hub checkpoint by its repo id and commit, a local file by
its sha256 (a second for H0-mini, against about 15 s to build and load the model). The
preprocessing comes from the architecture built on the meta device (no memory, no weights).
Anything uncertain (an ONNX export, an unreadable file, a half-done run) answers "not done",
and the usual resume path decides.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

logger = logging.getLogger(__name__)


def finished_output(output: Path, tiles: Sequence[Any], args: argparse.Namespace) -> Optional[int]:
    """The number of tiles when ``output`` already holds this run's result, else None."""
    from ..job import differences, tile_key
    from ..writers import read_embeddings

    if not output.is_file() or output.with_name(output.name + ".parts").exists():
        return None
    try:
        existing = read_embeddings(output)
    except Exception:  # unreadable: the embedding run reports and rewrites it
        return None
    if list(existing.tile_names) != [tile_key(t) for t in tiles]:
        return None
    try:
        expected = expected_settings(existing.provenance, args)
    except Exception as error:  # anything this check cannot settle is left to the run itself
        logger.debug("already-done check skipped: %s", error)
        return None
    if expected is None or "weights_sha256" not in existing.provenance or differences(existing.provenance, expected):
        return None
    return len(existing.tile_names)


def expected_settings(recorded: Dict[str, Any], args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    """The resume-key settings this run would record, or None when its weights differ from ``recorded``'s."""
    import torch

    from ..hub import resolve_checkpoint
    from ..model import architecture_for, default_weights, file_sha256
    from ..onnx_model import is_onnx_source
    from ..preprocess import Preprocessing
    from ..runtime import resolve_device, resolve_precision

    source = str(args.weights) if args.weights is not None else default_weights()
    if is_onnx_source(source):
        return None
    checkpoint = resolve_checkpoint(source, revision=args.revision, token=args.token, cache_dir=args.cache_dir,
                                    local_files_only=True if args.offline else None)
    if checkpoint.source == "hub" and checkpoint.revision:  # in the Hub cache: a commit names its files
        same = (recorded.get("repo_id"), recorded.get("revision")) == (checkpoint.repo_id, checkpoint.revision)
    else:
        same = recorded.get("weights_sha256") == file_sha256(checkpoint.weights_path)
    if not same:
        return None
    arch, model_kwargs, pretrained_cfg = architecture_for(checkpoint)
    import timm

    with torch.device("meta"):
        skeleton = timm.create_model(arch, pretrained=False, pretrained_cfg=pretrained_cfg, **model_kwargs)
    device = resolve_device(args.device)
    precision = {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[resolve_precision(args.precision, device)]
    return {
        "weights_sha256": recorded["weights_sha256"],
        "arch": arch,
        "output": args.embedding,
        "precision": precision,
        "weights_dtype": "float32",
        "preprocessing": Preprocessing.from_model(skeleton, args.input_size).describe(),
    }
