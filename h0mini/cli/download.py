"""``h0mini download``: fetch weights now, for machines that will run offline."""

from __future__ import annotations

import argparse

from ..constants import H0_MINI_REPO_ID
from ..errors import shown
from . import result


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "download",
        help="download weights into the Hub cache or a folder",
        description=(
            "Download config.json and the weights of a Hub repo, pinned to one commit. Prints the "
            "resolved revision and the sha256 of the weights file. With --local-dir, the folder also gets "
            "h0mini_source.json (repo id and commit), so that loading the folder builds what loading the repo "
            "builds. Then, offline: HF_HUB_OFFLINE=1 (same cache), or pass the folder to the other commands "
            "as --weights <local-dir> (or H0MINI_WEIGHTS=<local-dir>)."
        ),
        epilog="example: h0mini download --local-dir ./H0-mini",
    )
    parser.add_argument("repo_id", nargs="?", default=H0_MINI_REPO_ID,
                        help=f"Hub repo, repo@revision too (default: {H0_MINI_REPO_ID})")
    parser.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    parser.add_argument("--local-dir", default=None, help="write the files into this folder instead of the cache")
    parser.add_argument("--cache-dir", default=None, help="Hub cache folder (default: HF_HUB_CACHE)")
    parser.add_argument("--token", default=None, help="Hugging Face token (default: HF_TOKEN or the stored login)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..hub import download
    from ..model import file_sha256

    checkpoint = download(
        args.repo_id, revision=args.revision, token=args.token, cache_dir=args.cache_dir, local_dir=args.local_dir
    )
    result(args, f"repo_id:  {checkpoint.repo_id}")
    result(args, f"revision: {checkpoint.revision}")
    result(args, f"weights:  {shown(checkpoint.weights_path)}")
    if not args.quiet:
        result(args, f"sha256:   {file_sha256(checkpoint.weights_path)}")
    return 0
