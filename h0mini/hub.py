"""Find a checkpoint: a Hub repo (through huggingface_hub), a local folder, or one file.

The only module that imports huggingface_hub. Every Hub failure becomes an
h0mini error here, with the cause and the next step, chained with ``from``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Union

from huggingface_hub import constants as hf_constants
from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub import errors as hf_errors

from .constants import CONFIG_NAME, HUB_URL, PYTORCH_NAME, SAFETENSORS_NAME
from .errors import (
    GatedModelError,
    HubConnectionError,
    ModelNotFoundError,
    RevisionNotFoundError,
    WeightsNotCachedError,
)
from .version import __version__
from .wording import say

PathLike = Union[str, Path]

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
# Files searched in a folder, in order of preference (safetensors first: no pickle).
WEIGHT_FILES = (SAFETENSORS_NAME, PYTORCH_NAME, "pytorch_model.pth", "model.pth")

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class Checkpoint:
    """Where a model's files are, and where they came from."""

    weights_path: Path
    config: Optional[Dict[str, Any]]
    source: str  # "hub", "folder" or "file"
    repo_id: Optional[str] = None
    revision: Optional[str] = None  # the commit hash, when known


def is_local(weights: PathLike) -> bool:
    """True when ``weights`` names something on disk rather than a Hub repo id."""
    text = str(weights)
    if Path(text).expanduser().exists():
        return True
    return (
        isinstance(weights, Path)
        or text.startswith((".", "/", "~", "\\"))
        or text.lower().endswith(WEIGHT_SUFFIXES)
        or text.count("/") > 1
        or not _REPO_ID.match(text)
    )


def resolve_checkpoint(
    weights: PathLike,
    *,
    revision: Optional[str] = None,
    token: Union[str, bool, None] = None,
    cache_dir: Optional[PathLike] = None,
    local_files_only: Optional[bool] = None,
) -> Checkpoint:
    """Locate config and weights for ``weights`` (Hub id, folder or file), downloading if needed."""
    if isinstance(weights, str) and weights.startswith("hf-hub:"):  # timm's spelling, as on the model card
        weights = weights[len("hf-hub:"):]
    if is_local(weights):
        return _local_checkpoint(Path(str(weights)).expanduser())
    repo_id = str(weights)
    return _hub_checkpoint(
        repo_id,
        revision=revision,
        token=token,
        cache_dir=cache_dir,
        local_files_only=bool(local_files_only),
    )


def download(
    repo_id: str,
    *,
    revision: Optional[str] = None,
    token: Union[str, bool, None] = None,
    cache_dir: Optional[PathLike] = None,
    local_dir: Optional[PathLike] = None,
) -> Checkpoint:
    """Fetch config and weights now, pinned to one commit, for later offline use.

    Into the Hub cache, the branch or tag is recorded as huggingface_hub records it
    (``refs/<revision>``), so ``load_model(repo_id)`` later finds the files offline. Into
    ``local_dir``, the revision is first resolved to a commit hash, so config and weights
    come from the same commit even if the branch moves during the download.
    """
    if local_dir is None:
        return _hub_checkpoint(repo_id, revision=revision, token=token, cache_dir=cache_dir, local_files_only=False)
    with _hub_errors(repo_id, revision, token=token):
        weights_name = SAFETENSORS_NAME
        try:
            meta = get_hf_file_metadata(hf_hub_url(repo_id, weights_name, revision=revision), token=token)
        except hf_errors.EntryNotFoundError:
            weights_name = PYTORCH_NAME
            meta = get_hf_file_metadata(hf_hub_url(repo_id, weights_name, revision=revision), token=token)
        commit = meta.commit_hash or revision
        kwargs = dict(repo_id=repo_id, revision=commit, token=token, cache_dir=cache_dir, local_dir=local_dir)
        kwargs.update(_library())
        config_path = _optional_download(filename=CONFIG_NAME, **kwargs)
        weights_path = Path(hf_hub_download(filename=weights_name, **kwargs))
    return Checkpoint(
        weights_path=weights_path,
        config=_read_config(config_path) if config_path else None,
        source="hub",
        repo_id=repo_id,
        revision=commit,
    )


def _library() -> Dict[str, str]:
    return {"library_name": "h0mini", "library_version": __version__}


def _hub_checkpoint(
    repo_id: str,
    *,
    revision: Optional[str],
    token: Union[str, bool, None],
    cache_dir: Optional[PathLike],
    local_files_only: bool,
) -> Checkpoint:
    unresolved = None if local_files_only or hf_constants.HF_HUB_OFFLINE else _unresolvable_hub_host()
    kwargs: Dict[str, Any] = dict(
        repo_id=repo_id, token=token, cache_dir=cache_dir, local_files_only=local_files_only or bool(unresolved),
        **_library(),
    )
    with _hub_errors(repo_id, revision, token=token, local_files_only=local_files_only, unresolved=unresolved):
        config_path = _optional_download(filename=CONFIG_NAME, revision=revision, **kwargs)
        # Pin the weights to the commit the config came from.
        commit = _commit_from_cache_path(config_path) if config_path else None
        pinned = commit or revision
        try:
            weights_path = hf_hub_download(filename=SAFETENSORS_NAME, revision=pinned, **kwargs)
        except hf_errors.EntryNotFoundError as error:
            if isinstance(error, hf_errors.LocalEntryNotFoundError) and not _bin_is_cached(config_path):
                raise
            weights_path = hf_hub_download(filename=PYTORCH_NAME, revision=pinned, **kwargs)
    weights_path = Path(weights_path)
    return Checkpoint(
        weights_path=weights_path,
        config=_read_config(config_path) if config_path else None,
        source="hub",
        repo_id=repo_id,
        revision=commit or _commit_from_cache_path(weights_path) or revision,
    )


def _bin_is_cached(config_path: Optional[str]) -> bool:
    return bool(config_path) and (Path(config_path).parent / PYTORCH_NAME).exists()


def _optional_download(**kwargs: Any) -> Optional[str]:
    """Download a file that a repo may lack (config.json): None when the Hub says it is absent."""
    try:
        return hf_hub_download(**kwargs)
    except hf_errors.EntryNotFoundError as error:
        if isinstance(error, hf_errors.LocalEntryNotFoundError):
            raise
        return None


def _commit_from_cache_path(path: PathLike) -> Optional[str]:
    parent = Path(path).parent
    if parent.parent.name == "snapshots" and _COMMIT.match(parent.name):
        return parent.name
    return None


def _local_checkpoint(path: Path) -> Checkpoint:
    if path.is_dir():
        for name in WEIGHT_FILES:
            if (path / name).is_file():
                config_file = path / CONFIG_NAME
                config = _read_config(config_file) if config_file.is_file() else None
                return Checkpoint(weights_path=path / name, config=config, source="folder")
        present = sorted(p.name for p in path.iterdir())[:10]
        raise ModelNotFoundError(
            f"The folder {str(path)!r} holds no weights file: expected one of {', '.join(WEIGHT_FILES)} "
            f"(the Hub layout, beside config.json); found {present or 'nothing'}.",
            name=str(path),
        )
    if path.is_file():
        if path.suffix.lower() not in WEIGHT_SUFFIXES:
            raise ModelNotFoundError(
                f"{str(path)!r} is not a weights file: expected a .safetensors, .bin, .pth or .pt file.",
                name=str(path),
            )
        sibling = path.parent / CONFIG_NAME
        config = _read_config(sibling) if path.name in WEIGHT_FILES and sibling.is_file() else None
        return Checkpoint(weights_path=path, config=config, source="file")
    raise ModelNotFoundError(
        f"No such file or folder: {str(path)!r}. "
        + say("load_model(weights=...)", "--weights (or H0MINI_WEIGHTS)")
        + " takes a Hub repo id (e.g. 'bioptimus/H0-mini'), a folder in the Hub layout "
        "(config.json + model.safetensors), or a .safetensors/.bin/.pth file.",
        name=str(path),
    )


def _read_config(path: PathLike) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as error:
        raise ModelNotFoundError(f"Could not read the model config {str(path)!r}: {error}", name=str(path)) from error
    if not isinstance(config, dict):
        raise ModelNotFoundError(f"The model config {str(path)!r} is not a JSON object.", name=str(path))
    return config


def _unresolvable_hub_host() -> Optional[str]:
    """The Hub's host name when it does not resolve (no network or no DNS), else None.

    huggingface_hub retries a failed connection five times over ~25 s, which helps with a
    dropped packet but never with a name that does not resolve; then only the cache can help,
    so the caller goes straight to it. Behind a proxy the proxy resolves names: no check.
    """
    url = urllib.parse.urlsplit(hf_constants.ENDPOINT)
    if not url.hostname or urllib.request.getproxies().get(url.scheme):
        return None
    try:
        socket.getaddrinfo(url.hostname, url.port or (443 if url.scheme == "https" else 80))
    except socket.gaierror:
        return url.hostname
    except (OSError, UnicodeError):
        return None
    return None


def _token_source(token: Union[str, bool, None]) -> Optional[str]:
    """Where the token huggingface_hub sends comes from (never the token itself); None when none is sent."""
    if isinstance(token, str):
        return "the token passed as token= (--token on the command line)"
    if token is False:
        return None
    for variable in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if os.environ.get(variable, "").strip():
            return f"the token in the {variable} environment variable"
    stored = Path(hf_constants.HF_TOKEN_PATH)
    if stored.is_file() and stored.read_text(errors="replace").strip():
        return f"the token stored by `hf auth login` (huggingface-cli login) in {str(stored)!r}"
    return None


def _offline_reason(local_files_only: bool, unresolved: Optional[str] = None) -> str:
    if unresolved:
        return f"the Hub's host name {unresolved!r} does not resolve (no network or no DNS)"
    if local_files_only:
        return say("local_files_only=True was passed", "--offline was passed")
    if hf_constants.HF_HUB_OFFLINE:
        return "offline mode is on (HF_HUB_OFFLINE=1)"
    return "the Hub could not be reached (no network, a proxy or a firewall)"


@contextlib.contextmanager
def _hub_errors(
    repo_id: str,
    revision: Optional[str],
    *,
    token: Union[str, bool, None],
    local_files_only: bool = False,
    unresolved: Optional[str] = None,
) -> Iterator[None]:
    """Turn huggingface_hub's exceptions into h0mini's, each saying what to do next."""
    page = f"{HUB_URL}/{repo_id}"
    try:
        yield
    except hf_errors.GatedRepoError as error:
        source = _token_source(token)
        told = (
            f"It refused {source}: check that this token is current (not revoked), that its account has been "
            "granted access, and for a fine-grained token that it may read gated repos"
            if source
            else "No token was sent"
        )
        raise GatedModelError(
            f"Access to {repo_id!r} is gated and the Hub refused it. {told}. Request access at {page} "
            "(approval can take a while), then pass the token of the approved account as "
            + say("load_model(..., token='hf_...')", "--token hf_...")
            + " or in the HF_TOKEN environment variable.",
            repo_id=repo_id,
        ) from error
    except hf_errors.RepositoryNotFoundError as error:
        raise ModelNotFoundError(
            f"Repository {repo_id!r} was not found on the Hub ({hf_constants.ENDPOINT}). Check the name; if it is "
            "private or gated, "
            + say("pass token='hf_...'", "pass --token hf_...")
            + " or set HF_TOKEN. For a local model, "
            + say("pass its folder or file path as weights=.", "pass --weights DIR (or set H0MINI_WEIGHTS)."),
            name=repo_id,
        ) from error
    except hf_errors.RevisionNotFoundError as error:
        raise RevisionNotFoundError(
            f"Revision {revision!r} does not exist in {repo_id!r}. Use a branch, tag or commit hash listed at "
            f"{page}/commits/main, or leave revision unset for the latest.",
            name=repo_id,
            revision=str(revision),
        ) from error
    except hf_errors.LocalEntryNotFoundError as error:
        raise WeightsNotCachedError(
            f"The weights of {repo_id!r}"
            + (f" at revision {revision!r}" if revision else "")
            + f" are not in the local cache ({hf_constants.HF_HUB_CACHE}) and {_offline_reason(local_files_only, unresolved)}. "
            "On a machine with internet access run `h0mini download` and copy the cache (or its --local-dir folder) "
            "here, or "
            + say(
                "pass a local folder: load_model('/path/to/H0-mini').",
                "pass a local folder: --weights /path/to/H0-mini (or set H0MINI_WEIGHTS=/path/to/H0-mini).",
            )
            + " To try the pipeline without access: "
            + say("h0mini.testing.write_demo_weights('DIR').", "h0mini demo-weights DIR."),
            repo_id=repo_id,
        ) from error
    except hf_errors.EntryNotFoundError as error:
        raise ModelNotFoundError(
            f"Repository {repo_id!r} has no weights file ({SAFETENSORS_NAME} or {PYTORCH_NAME})"
            + (f" at revision {revision!r}" if revision else "")
            + ". Is it a timm model repository?",
            name=repo_id,
        ) from error
    except hf_errors.HfHubHTTPError as error:
        status = getattr(getattr(error, "response", None), "status_code", "?")
        raise HubConnectionError(
            f"The Hub answered HTTP {status} for {repo_id!r}. Try again later; if it persists, download the "
            "weights elsewhere with `h0mini download` and pass the local folder"
            + say(" as weights=.", " with --weights DIR.")
        ) from error
    except hf_errors.OfflineModeIsEnabled as error:
        raise WeightsNotCachedError(
            f"Cannot reach the Hub for {repo_id!r}: {_offline_reason(local_files_only)}. Unset HF_HUB_OFFLINE "
            "to download, or pass a local folder"
            + say(" as weights=.", ": --weights DIR (or set H0MINI_WEIGHTS)."),
            repo_id=repo_id,
        ) from error
    except Exception as error:
        # Connection failures outside hf_hub_download's own cache fallback (the metadata call of `download`).
        if _is_connection_error(error):
            raise WeightsNotCachedError(
                f"Cannot reach the Hub ({hf_constants.ENDPOINT}) for {repo_id!r}: {type(error).__name__}. "
                "Check the network, or pass a local folder"
                + say(" as weights=.", " with --weights DIR."),
                repo_id=repo_id,
            ) from error
        raise


def _is_connection_error(error: BaseException) -> bool:
    name = type(error).__name__
    module = type(error).__module__
    return module.split(".")[0] in {"httpx", "httpx2", "httpcore", "httpcore2", "requests", "urllib3"} and (
        "Connect" in name or "Timeout" in name or "Network" in name or "Proxy" in name
    )
