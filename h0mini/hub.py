"""Find a checkpoint: a Hub repo (through huggingface_hub), a local folder, or one file.

The only module that imports huggingface_hub. Every Hub failure becomes an
h0mini error here, with the cause and the next step, chained with ``from``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple, Union

from huggingface_hub import constants as hf_constants
from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub import errors as hf_errors

from .constants import CONFIG_NAME, HUB_URL, PYTORCH_NAME, SAFETENSORS_NAME, SOURCE_NAME
from .errors import (
    GatedModelError,
    HubConnectionError,
    InvalidArgumentError,
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
    """Locate config and weights for ``weights`` (Hub id, folder or file), downloading if needed.

    A Hub id may carry its revision, ``"org/repo@<commit>"``, also in timm's ``"hf-hub:org/repo@rev"``
    spelling; a path that exists is always a path.
    """
    if isinstance(weights, str) and weights.startswith("hf-hub:"):  # timm's spelling, as on the model card
        weights = weights[len("hf-hub:"):]
    repo_id, revision = split_revision(weights, revision)
    if repo_id is None:
        return _local_checkpoint(Path(str(weights)).expanduser())
    return _hub_checkpoint(
        repo_id,
        revision=revision,
        token=token,
        cache_dir=cache_dir,
        local_files_only=bool(local_files_only),
    )


def split_revision(weights: PathLike, revision: Optional[str] = None) -> Tuple[Optional[str], Optional[str]]:
    """``(repo_id, revision)`` for a Hub id (``"org/repo"`` or ``"org/repo@rev"``), ``(None, revision)`` for a path.

    Raises:
        InvalidArgumentError: ``@rev`` and a different ``revision`` were both given.
    """
    if is_local(weights) and not _names_a_revision(weights):
        return None, revision
    repo_id, _, pinned = str(weights).partition("@")
    if not pinned:
        return repo_id, revision
    if revision is not None and revision != pinned:
        raise InvalidArgumentError(
            f"{str(weights)!r} names revision {pinned!r} but "
            + say(f"revision={revision!r}", f"--revision {revision}")
            + " was also given; pass one of them"
        )
    return repo_id, pinned


def _names_a_revision(weights: PathLike) -> bool:
    """``org/repo@rev`` that is not a path on disk."""
    text = str(weights)
    if isinstance(weights, Path) or "@" not in text or Path(text).expanduser().exists():
        return False
    name, _, pinned = text.partition("@")
    return bool(_REPO_ID.match(name)) and bool(re.match(r"^[\w./-]+$", pinned))


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
    come from the same commit even if the branch moves during the download, and
    ``h0mini_source.json`` records the repo id and commit beside them: loading the folder then
    builds what loading the repo id builds (the same architecture and provenance).
    """
    repo_id, revision = split_revision(repo_id, revision)
    if repo_id is None or not _REPO_ID.match(repo_id):
        raise InvalidArgumentError(f"{str(repo_id)!r} is not a Hub repo id: expected 'org/name' (or 'org/name@revision')")
    if local_dir is None:
        return _hub_checkpoint(repo_id, revision=revision, token=token, cache_dir=cache_dir, local_files_only=False,
                               downloading=True)
    with _hub_errors(repo_id, revision, token=token, downloading=True):
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
    write_source(Path(local_dir), repo_id=repo_id, revision=commit, weights_file=weights_path.name)
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
    downloading: bool = False,
) -> Checkpoint:
    offline = local_files_only or hf_constants.HF_HUB_OFFLINE
    unreachable = None if offline else _unreachable(repo_id, revision, token)
    kwargs: Dict[str, Any] = dict(
        repo_id=repo_id, token=token, cache_dir=cache_dir, local_files_only=local_files_only or bool(unreachable),
        **_library(),
    )
    with _hub_errors(repo_id, revision, token=token, local_files_only=local_files_only, unreachable=unreachable,
                     downloading=downloading):
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
                origin = read_source(path)
                return Checkpoint(weights_path=path / name, config=config, source="folder",
                                  repo_id=origin.get("repo_id"), revision=origin.get("revision"))
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


def write_source(folder: Path, *, repo_id: str, revision: Optional[str], weights_file: str) -> None:
    """``h0mini_source.json`` beside downloaded files: which repo and commit they are."""
    record = {"repo_id": repo_id, "revision": revision, "weights_file": weights_file, "downloaded_with": __version__}
    tmp = folder / f".{SOURCE_NAME}.tmp"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, folder / SOURCE_NAME)


def read_source(folder: Path) -> Dict[str, Optional[str]]:
    """What ``write_source`` recorded in ``folder`` (empty when nothing, or something unreadable, is there)."""
    try:
        record = json.loads((folder / SOURCE_NAME).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(record, dict) or not isinstance(record.get("repo_id"), str):
        return {}
    revision = record.get("revision")
    return {"repo_id": record["repo_id"], "revision": revision if isinstance(revision, str) else None}


def _unreachable(repo_id: str, revision: Optional[str], token: Union[str, bool, None]) -> Optional[str]:
    """Why the Hub cannot be reached (None when it answers, whatever it answers).

    huggingface_hub's own metadata request for the config, without its retries: a download that
    fails to connect retries five times over about 25 s, which helps with a dropped packet but not
    with no network. A connection failure is classified here and the load goes to the cache; any
    answer (a file, 404, gated) lets ``hf_hub_download`` go on as usual.
    """
    url = hf_hub_url(repo_id, CONFIG_NAME, revision=revision)
    try:
        get_hf_file_metadata(url, token=token, timeout=10, retry_on_errors=False, **_library())
    except hf_errors.OfflineModeIsEnabled:
        return "offline mode is on (HF_HUB_OFFLINE=1)"
    except Exception as error:
        if _is_connection_error(error):
            return _connection_failure(error)
    return None


def _connection_failure(error: BaseException) -> str:
    """huggingface_hub's connection error in words: no DNS, refused, timed out, a proxy."""
    host = urllib.parse.urlsplit(hf_constants.ENDPOINT).hostname or hf_constants.ENDPOINT
    chain: list = []
    cause: Optional[BaseException] = error
    while cause is not None and len(chain) < 8:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    text = " ".join(str(e) for e in chain).lower()
    names = " ".join(type(e).__name__ for e in chain)
    if "gaierror" in names or "name or service not known" in text or "name resolution" in text or "nodename" in text:
        return f"the Hub's host name {host!r} does not resolve (no network or no DNS)"
    if "Proxy" in names:
        return f"the proxy refused the connection to {hf_constants.ENDPOINT}"
    if "Timeout" in names:
        return f"{hf_constants.ENDPOINT} did not answer in time"
    if "refused" in text:
        return f"{hf_constants.ENDPOINT} refused the connection"
    first = str(error).splitlines()[0] if str(error) else ""
    return f"the Hub could not be reached ({type(error).__name__}: {first})"


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


def _offline_reason(local_files_only: bool, unreachable: Optional[str] = None) -> str:
    if unreachable:
        return unreachable
    if local_files_only:
        return say("local_files_only=True was passed", "--offline was passed")
    if hf_constants.HF_HUB_OFFLINE:
        return "offline mode is on (HF_HUB_OFFLINE=1)"
    return "the Hub could not be reached (no network, a proxy or a firewall)"


def _elsewhere(downloading: bool) -> str:
    """The next step when the Hub is out of reach: for ``h0mini download`` itself, or for a command that loads."""
    if downloading:
        return ("Run " + say("download()", "`h0mini download`") + " on a machine with internet access, then copy "
                "its --local-dir folder (or the Hub cache) here and pass the folder "
                + say("to load_model('/path/to/H0-mini').",
                      "to the other commands as --weights DIR (or set H0MINI_WEIGHTS)."))
    return ("On a machine with internet access run `h0mini download` and copy the cache (or its --local-dir folder) "
            "here, or " + say("pass a local folder: load_model('/path/to/H0-mini').",
                              "pass a local folder: --weights /path/to/H0-mini (or set H0MINI_WEIGHTS=/path/to/H0-mini)."))


@contextlib.contextmanager
def _hub_errors(
    repo_id: str,
    revision: Optional[str],
    *,
    token: Union[str, bool, None],
    local_files_only: bool = False,
    unreachable: Optional[str] = None,
    downloading: bool = False,
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
        reason = _offline_reason(local_files_only, unreachable or _cause_of(error))
        raise WeightsNotCachedError(
            f"The weights of {repo_id!r}"
            + (f" at revision {revision!r}" if revision else "")
            + f" are not in the local cache ({hf_constants.HF_HUB_CACHE}) and {reason}. "
            + _elsewhere(downloading)
            + ("" if downloading else " To try the pipeline without access: "
               + say("h0mini.testing.write_demo_weights('DIR').", "h0mini demo-weights DIR.")),
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
            f"The Hub answered HTTP {status} for {repo_id!r}. Try again later; if it persists: " + _elsewhere(downloading)
        ) from error
    except hf_errors.OfflineModeIsEnabled as error:
        raise WeightsNotCachedError(
            f"Cannot reach the Hub for {repo_id!r}: {_offline_reason(local_files_only)}. Unset HF_HUB_OFFLINE "
            "to download. " + _elsewhere(downloading),
            repo_id=repo_id,
        ) from error
    except Exception as error:
        # Connection failures outside hf_hub_download's own cache fallback (the metadata call of `download`).
        if _is_connection_error(error):
            raise WeightsNotCachedError(
                f"Cannot reach the Hub for {repo_id!r}: {_connection_failure(error)}. " + _elsewhere(downloading),
                repo_id=repo_id,
            ) from error
        raise


def _cause_of(error: BaseException) -> Optional[str]:
    """huggingface_hub's cache fallback chains the failed request: classify it when it was a connection failure."""
    cause = error.__cause__
    if isinstance(cause, hf_errors.OfflineModeIsEnabled):
        return "offline mode is on (HF_HUB_OFFLINE=1)"
    return _connection_failure(cause) if cause is not None and _is_connection_error(cause) else None


def _is_connection_error(error: BaseException) -> bool:
    name = type(error).__name__
    module = type(error).__module__
    return module.split(".")[0] in {"httpx", "httpx2", "httpcore", "httpcore2", "requests", "urllib3"} and (
        "Connect" in name or "Timeout" in name or "Network" in name or "Proxy" in name
    )
