"""``embed_slides``: a cohort of slides through one tile pipeline, any number of processes per folder.

One room over the tile pipeline and the writers:

- a *planner* thread walks this process's slides in order: it claims each one (``claims``), skips
  it when its output is already complete for these settings, opens and tiles it, and draws its QC
  picture, one or two slides ahead of the model;
- the tiles of slide after slide form **one stream** through ``TileEmbedder.iter_batches``, so the
  same reader workers serve the whole cohort and the model never waits between slides;
- each batch's rows go to their slide's ``OutputJob`` (unique part files), and a slide whose last
  tile is in is written (streamed from its parts, atomically), released, and reported in
  ``summary.csv`` and the log, with an ETA.

Memory stays flat however many slides: a slide's handle, mask and rows are dropped when it is
written, and outputs are assembled from parts on disk one part at a time.
"""

from __future__ import annotations

import collections
import contextvars
import logging
import math
import os
import queue
import shutil
import socket
import threading
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Deque, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch

from ..atomic import remove_stale_temp
from ..deprecation import take_options
from ..embed import ModelLike, TileEmbedder, make_progress
from ..errors import H0miniError, InvalidArgumentError, shown
from ..interrupt import signals_held
from ..job import (SAME_NUMBERS, OutputJob, PartStore, SettingsMismatchError, differences, job_settings,
                   saved_provenance)
from ..tiles import TileInput
from ..wording import say
from ..writers import check_writable
from .claims import CLAIM_TIMEOUT, Claims
from .embed import slide_request
from .grid import MIN_TISSUE, TARGET_MPP, SlideTiles, tile_slide
from .manifest import SlideSpec, slide_fingerprint, slide_specs
from .qc import save_qc_image
from .reader import release
from .shard import Shard, resolve_shard
from .summary import ALREADY_DONE, CLAIMED, DONE, FAILED, SlideStatus, update_summary

logger = logging.getLogger(__name__)

LOOKAHEAD = 2  # slides planned (claimed, tiled, QC drawn) ahead of the one being embedded
# summary.csv is merged at most this often (and at once for a failure, and at the end): every merge reads
# and rewrites the whole file under a lock every process of the folder shares.
SUMMARY_EVERY = 10.0  # seconds
_END = object()


def embed_slides(
    slides: Union[str, os.PathLike, Sequence[Union[str, os.PathLike, SlideSpec]]],
    model: ModelLike = None,
    *,
    output_dir: Union[str, os.PathLike, None] = None,
    shard: Union[str, Shard, None] = None,
    qc: bool = True,
    progress: Optional[bool] = None,
    mpp: Optional[float] = None,
    target_mpp: float = TARGET_MPP,
    overlap: int = 0,
    tissue: Union[str, None] = "otsu",
    min_tissue: float = MIN_TISSUE,
    reader: str = "auto",
    allow_upsampling: bool = False,
    slide_pool: Optional[str] = None,
    embedding: str = "cls+mean",
    batch_size: Optional[int] = None,
    device: Union[str, torch.device] = "auto",
    precision: str = "auto",
    num_workers: Union[int, str] = "auto",
    input_size: Union[int, str, None] = None,
    compile: bool = False,
    jpeg_decode: str = "cpu",
    on_error: str = "raise",
    save_every: int = 1024,
    overwrite: bool = False,
    claim_timeout: float = CLAIM_TIMEOUT,
    revision: Optional[str] = None,
    token: Union[str, bool, None] = None,
    cache_dir: Union[str, os.PathLike, None] = None,
    **options: Any,
) -> List[SlideStatus]:
    """Embed a cohort of slides, one ``OUTPUT_DIR/<name>.h5`` each: resumable, and safe for any number
    of processes on any number of machines sharing ``output_dir``.

    Each slide is claimed by exactly one process (``OUTPUT_DIR/.claims``); a dead process's claim is
    taken over. A rerun skips slides whose output matches the slide (size, mtime, level-0 size) and
    every setting that changes the numbers, resumes half-done ones from their saved batches, and
    stops, naming the setting, when saved work was made otherwise (``overwrite=True`` replaces it).
    A slide that fails is reported and the others go on.

    Args:
        slides: slide files, folders of slides (a DICOM folder is one slide), globs, ``SlideSpec``s,
            or a manifest CSV (a ``slide`` column, optional ``mpp``, ``mask``, ``name``; other
            columns are kept as attributes of the output).
        model: a model from ``load_model()`` or weights to load. Default: H0-mini.
        output_dir: where ``<name>.h5``, ``qc/<name>.png`` and ``summary.csv`` go.
        shard: ``"K/N"`` (0-based K): only that share. Default: the share of this process under
            torchrun (RANK/WORLD_SIZE), srun (SLURM_PROCID/SLURM_NTASKS) and SLURM arrays, combined,
            first, then the other shares' slides that nobody has claimed.
        qc: write the QC picture of each slide.
        overwrite: replace saved outputs and parts made with other settings.
        claim_timeout: seconds without a heartbeat after which another host's claim counts as dead.
        embedding, batch_size, device, precision, num_workers, input_size, compile, jpeg_decode,
            revision, token, cache_dir, on_error, progress: as in ``h0mini.embed_tiles`` (the same
            names and defaults); under torchrun or srun, ``device="auto"`` is this process's GPU.
        mpp, target_mpp, overlap, tissue, min_tissue, reader, allow_upsampling, slide_pool,
            save_every: as in ``embed_slide`` (a manifest's ``mpp`` and ``mask`` win for their slide).
        **options: only ``output=`` (the previous name of ``embedding``), with a ``DeprecationWarning``.

    Returns:
        One ``SlideStatus`` per slide this process looked at, in order (``summary.csv`` has every
        slide of the folder).

    Raises:
        SlideError: no slides found, a bad manifest row, or two slides with one output name
            (all listed together, before the model loads).
        SettingsMismatchError: saved outputs made with other settings (all listed, before any work).
        OutputNotWritableError: ``output_dir`` cannot be written (checked before the model loads).
    """
    if output_dir is None:
        if isinstance(model, (str, os.PathLike)) and not _looks_like_weights(model):
            warnings.warn("embed_slides(slides, output_dir, model) is deprecated and will be removed in the next "
                          "release: use embed_slides(slides, model, output_dir=...)", DeprecationWarning, stacklevel=2)
            output_dir, model = model, options.pop("model", None)
        else:
            raise InvalidArgumentError("embed_slides needs output_dir=, the folder for the outputs")
    embedding = take_options("embed_slides", embed_slides, options, {"embedding": embedding})["embedding"]
    if on_error not in ("raise", "skip"):
        raise InvalidArgumentError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if slide_pool not in (None, "mean"):
        raise InvalidArgumentError(f"slide_pool must be None or 'mean', got {slide_pool!r}")
    _check_tiling_arguments(mpp, target_mpp, overlap, min_tissue)
    specs = slide_specs(slides, mpp=mpp)
    chosen = shard if isinstance(shard, Shard) else resolve_shard(shard)
    out = Path(output_dir)
    check_writable(out, folder=True)
    mine = chosen.order(specs)
    if device == "auto" and chosen.local_rank is not None and torch.cuda.is_available():
        device = f"cuda:{chosen.local_rank}"
    embedder = TileEmbedder(model, embedding=embedding, batch_size=batch_size, device=device, precision=precision,
                            num_workers=num_workers, input_size=input_size, compile=compile, jpeg_decode=jpeg_decode,
                            revision=revision, token=token, cache_dir=cache_dir)
    if slide_pool and embedder.embedding not in ("cls", "mean", "cls+mean"):
        raise InvalidArgumentError(f"slide_pool='mean' needs vector outputs (cls, mean, cls+mean), not {embedder.embedding!r}")
    run = _Cohort(out, embedder, job_settings(embedder), chosen, qc=qc, reader=reader, on_error=on_error,
                  save_every=save_every, overwrite=overwrite, claims=Claims(out, timeout=claim_timeout),
                  request=dict(target_mpp=target_mpp, overlap=overlap, tissue=tissue, min_tissue=min_tissue,
                               allow_upsampling=allow_upsampling, slide_pool=slide_pool))
    if not overwrite:
        run.refuse_mismatches(mine)
    return run.run(mine, progress)


def _looks_like_weights(value: Any) -> bool:
    path = Path(os.fspath(value))
    return path.is_file() or (path.is_dir() and any((path / n).exists() for n in ("config.json", "model.safetensors")))


def _check_tiling_arguments(mpp: Optional[float], target_mpp: float, overlap: int, min_tissue: float) -> None:
    """The run-wide tiling arguments, checked before the model loads (per-slide ones: in the manifest)."""
    if mpp is not None and not (isinstance(mpp, (int, float)) and math.isfinite(mpp) and mpp > 0):
        raise InvalidArgumentError(f"mpp must be a positive number of µm/px, got {mpp!r}")
    if not (isinstance(target_mpp, (int, float)) and math.isfinite(target_mpp) and target_mpp > 0):
        raise InvalidArgumentError(f"target_mpp must be a positive number of µm/px, got {target_mpp!r}")
    if not (isinstance(overlap, int) and overlap >= 0):
        raise InvalidArgumentError(f"overlap must be a non-negative integer number of pixels, got {overlap!r}")
    if not 0.0 <= float(min_tissue) <= 1.0:
        raise InvalidArgumentError(f"min_tissue must be in [0, 1], got {min_tissue!r}")


@dataclass(eq=False)
class _Plan:
    """One slide on its way through the stream."""

    spec: SlideSpec
    status: Optional[SlideStatus] = None  # set when the slide needs no embedding (done, claimed, failed)
    tiles: Optional[SlideTiles] = None
    job: Optional[OutputJob] = None
    pending: List[Any] = field(default_factory=list)
    skipped: List[Dict[str, Any]] = field(default_factory=list)
    failure: Optional[str] = None
    qc: str = ""
    started: float = 0.0
    start: int = 0  # this slide's positions in the stream: [start, end)
    end: int = 0


class _Cohort:
    def __init__(self, out: Path, embedder: TileEmbedder, settings: Dict[str, Any], shard: Shard, *, qc: bool,
                 reader: str, on_error: str, save_every: int, overwrite: bool, claims: Claims,
                 request: Dict[str, Any]):
        self.out, self.embedder, self.settings, self.shard = out, embedder, settings, shard
        self.qc, self.reader, self.on_error, self.save_every = qc, reader, on_error, save_every
        self.overwrite, self.claims, self.request = overwrite, claims, request
        self.statuses: List[SlideStatus] = []
        self._unsaved_rows: List[SlideStatus] = []  # summary rows not yet merged into summary.csv
        self._summary_saved = -math.inf
        self._active: Deque[_Plan] = collections.deque()
        self._stop = threading.Event()
        self._seconds: List[float] = []
        self._total = 0
        self._planner_error: Optional[BaseException] = None

    # -- before any work ---------------------------------------------------------------------

    def output_of(self, spec: SlideSpec) -> Path:
        return self.out / f"{spec.name}.h5"

    def request_of(self, spec: SlideSpec) -> Dict[str, Any]:
        request = dict(self.request, mpp=spec.mpp)
        if spec.mask is not None:
            request["tissue"] = "mask"
        recorded = slide_request(**request)
        if spec.mask is not None:  # an edited mask tiles otherwise: its output is not done
            recorded["mask"] = slide_fingerprint(spec.mask)
        return recorded

    def expected(self, spec: SlideSpec) -> Dict[str, Any]:
        """The provenance keys an output of ``spec`` must carry to count as done."""
        return dict(self.settings, slide=slide_fingerprint(spec.path), request=self.request_of(spec))

    def _saved_differences(self, spec: SlideSpec, saved: Dict[str, Any]) -> Dict[str, Any]:
        saved = dict(saved, request=(saved.get("tiling") or {}).get("request"))
        keys = [k for k in SAME_NUMBERS if k != "tiling"] + ["request"]  # "slide" is one of SAME_NUMBERS
        return differences(saved, self.expected(spec), keys)

    def refuse_mismatches(self, specs: Sequence[SlideSpec]) -> None:
        """Stop before any work when saved outputs or parts were made otherwise; name every one."""
        found = []
        for spec in specs:
            target = self.output_of(spec)
            parts = PartStore(target.with_name(target.name + ".parts"), {})
            for path, saved in ((target, saved_provenance(target, quiet=True)), (parts.folder, parts.saved_settings())):
                if saved is None:
                    continue
                diff = self._saved_differences(spec, saved)
                if diff:
                    found.append((path, diff))
        if found:
            if len(found) == 1:
                raise SettingsMismatchError(*found[0])
            lines = "\n".join(f"  {shown(path)}: " + "; ".join(f"{k}: saved {v[0]!r}, now {v[1]!r}"
                                                             for k, v in diff.items()) for path, diff in found[:20])
            more = f"\n  ... and {len(found) - 20} more" if len(found) > 20 else ""
            error = SettingsMismatchError(found[0][0], found[0][1])
            error.args = (f"{len(found)} saved outputs or parts were made with other settings:\n{lines}{more}\n"
                          "Nothing was deleted: rerun with the saved settings to resume, or "
                          f"{say('pass overwrite=True', 'add --overwrite')} to replace them",)
            raise error

    def done(self, spec: SlideSpec) -> Optional[int]:
        """The tile count of a complete output of ``spec`` made with these settings, or None."""
        saved = saved_provenance(self.output_of(spec), quiet=True)
        if saved is None or self._saved_differences(spec, saved):
            return None
        if self.on_error == "raise" and saved.get("num_skipped"):
            return None  # tiles skipped by an earlier run are tried again: --on-error raise retries them
        return int(saved.get("num_tiles", 0))

    # -- the run -----------------------------------------------------------------------------

    def run(self, specs: List[SlideSpec], progress: Optional[bool]) -> List[SlideStatus]:
        self._total = len(specs)
        plans: "queue.Queue[Any]" = queue.Queue(maxsize=LOOKAHEAD)
        context = contextvars.copy_context()  # messages in the planner use the caller's words (CLI or Python)
        planner = threading.Thread(target=context.run, args=(self._plan_all, specs, plans), name="h0mini-planner",
                                   daemon=True)
        source = TileInput(self._stream(plans, planner), single=False, length=None, all_paths=True)
        received = 0
        try:
            with make_progress(progress, total=len(specs), unit="slide", desc="slides") as bar:
                for batch in self.embedder.iter_batches(source, on_error="skip"):
                    positions = [int(i) for i in batch.indices] + [s.index for s in batch.skipped]
                    self._route(batch)
                    received = max(received, max(positions) + 1) if positions else received
                    self._finish_ready(received, bar)
                self._finish_ready(math.inf, bar)
                if self._planner_error is not None:  # the slides after it were never planned: say so
                    raise self._planner_error
        except BaseException:  # Ctrl-C, SIGTERM, a crash: keep everything finished, give back the claims
            with signals_held():  # a second Ctrl-C or SIGTERM waits until that is done
                try:
                    self._keep_finished_work()
                finally:  # even when saving fails: stop the planner and the heartbeat, give back the claims
                    self._shut_down(planner)
            raise
        self._shut_down(planner)
        if not self.statuses or self._unsaved_rows:
            update_summary(self.out, self._unsaved_rows)  # the last rows; an empty share's summary
        return self.statuses

    def _keep_finished_work(self) -> None:
        if self._unsaved_rows:  # the slides already written get their rows
            self._save_summary()
        for plan in list(self._active):  # and the slides in progress their finished batches
            if plan.job is not None:
                try:
                    plan.job.flush()
                except OSError:
                    pass

    def _shut_down(self, planner: threading.Thread) -> None:
        self._stop.set()
        if planner.is_alive():
            planner.join(timeout=10)
        self.claims.release_all()

    def _plan_all(self, specs: List[SlideSpec], plans: "queue.Queue[Any]") -> None:
        try:
            for spec in specs:
                if self._stop.is_set():
                    return
                self._hand_over(plans, self._plan(spec))
        except BaseException as error:  # raised in the caller's thread once the planned slides are written
            self._planner_error = error
        finally:
            self._hand_over(plans, _END)

    def _hand_over(self, plans: "queue.Queue[Any]", item: Any) -> None:
        """Queue ``item`` for the stream, unless the run stops first."""
        while not self._stop.is_set():
            try:
                plans.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _plan(self, spec: SlideSpec) -> _Plan:
        plan = _Plan(spec, started=time.perf_counter())
        target = self.output_of(spec)
        try:
            finished = self.done(spec)
            if finished is not None:
                self._remove_leftover_parts(spec)
                plan.status = self._status(plan, ALREADY_DONE, tiles=finished)
                return plan
            owner = self.claims.acquire(spec.name)
            if owner is not None:
                plan.status = self._status(plan, CLAIMED, error=f"claimed by {owner.describe()}")
                return plan
            finished = self.done(spec)  # finished by another process while we looked
            if finished is not None:
                self.claims.release(spec.name)
                plan.status = self._status(plan, ALREADY_DONE, tiles=finished)
                return plan
            plan.tiles = tile_slide(
                spec.path, mpp=spec.mpp, target_mpp=self.request["target_mpp"],
                tile_size=self.embedder.preprocessing.size or 224, overlap=self.request["overlap"],
                tissue=spec.mask if spec.mask is not None else self.request["tissue"],
                min_tissue=self.request["min_tissue"], reader=self.reader,
                allow_upsampling=self.request["allow_upsampling"],
            )
            tiling = dict(plan.tiles.settings(), request=self.request_of(spec))
            settings = dict(self.settings, tiling=tiling, slide=slide_fingerprint(spec.path))
            plan.job = OutputJob(target, settings, self.embedder, overwrite=self.overwrite)
            saved = plan.job.saved_names()
            plan.pending = [r for r in plan.tiles.regions() if r.name not in saved]
            if self.qc:
                plan.qc = self._draw_qc(plan)
        except (H0miniError, OSError, ValueError) as error:
            self.claims.release(spec.name)
            release(spec.path)  # opened, then failed (tiling, QC): nothing of it is embedded or kept open
            plan.tiles, plan.pending, plan.job = None, [], None
            plan.status = self._status(plan, FAILED, error=" ".join(str(error).split()))
        return plan

    def _remove_leftover_parts(self, spec: SlideSpec) -> None:
        """The saved batches of a complete output (a writer killed between its output and their removal),
        removed under the slide's claim."""
        target = self.output_of(spec)
        parts = target.with_name(target.name + ".parts")
        if not parts.exists() or self.claims.acquire(spec.name) is not None:
            return
        try:
            if self.done(spec) is not None:
                shutil.rmtree(parts, ignore_errors=True)
        finally:
            self.claims.release(spec.name)

    def _draw_qc(self, plan: _Plan) -> str:
        path = self.out / "qc" / f"{plan.spec.name}.png"
        remove_stale_temp(path)
        save_qc_image(plan.tiles, path)
        return str(path)

    def _stream(self, plans: "queue.Queue[Any]", planner: threading.Thread) -> Iterator[Any]:
        """The tiles of slide after slide, registering each slide's place in the stream.

        The planner starts on the first tile asked for: by then the reader workers have been
        forked, so no worker is forked while the planner is inside a slide library.
        """
        planner.start()
        position = 0
        while True:
            try:
                plan = plans.get(timeout=0.1)
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            if plan is _END:
                return
            plan.start = position
            plan.end = position + len(plan.pending)
            self._active.append(plan)
            for region in plan.pending:
                yield region
            position = plan.end

    def _route(self, batch: Any) -> None:
        """Hand each row of ``batch`` to its slide's job."""
        by_plan: Dict[int, List[int]] = {}
        active = list(self._active)
        for row, index in enumerate(batch.indices):
            plan = next(p for p in active if p.start <= index < p.end)
            by_plan.setdefault(id(plan), []).append(row)
        for plan in active:
            rows = by_plan.get(id(plan))
            if rows and plan.failure is None:
                names = [plan.pending[int(batch.indices[r]) - plan.start].name for r in rows]
                take = torch.as_tensor(rows)
                plan.job.add(names, {k: v[take] for k, v in batch.features.items()}, self.save_every)
        for bad in batch.skipped:
            plan = next(p for p in active if p.start <= bad.index < p.end)
            region = plan.pending[bad.index - plan.start]
            reason = f"{bad.reason} (tile at x={region.coords[0]}, y={region.coords[1]})"
            plan.skipped.append({"index": bad.index - plan.start, "path": region.name, "reason": reason})
            if self.on_error == "raise" and plan.failure is None:
                plan.failure = f"{region.name}: {reason}; --on-error skip leaves unreadable tiles out"

    def _finish_ready(self, received: float, bar: Any) -> None:
        while self._active and self._active[0].end <= received:
            plan = self._active.popleft()
            status = plan.status or self._write(plan)
            self.statuses.append(status)
            self._unsaved_rows.append(status)
            if status.status == FAILED or time.monotonic() - self._summary_saved >= SUMMARY_EVERY:
                self._save_summary()
            self._log(status)
            bar.update(1)

    def _save_summary(self) -> None:
        """Merge the rows not yet saved into summary.csv (a failure waits for the next try)."""
        try:
            update_summary(self.out, self._unsaved_rows)
            self._unsaved_rows = []
        except OSError as error:  # the outputs are written; a summary row is not worth the cohort
            logger.warning("could not update %s (%s); the next finished slide tries again",
                           shown(self.out / "summary.csv"), error)
        self._summary_saved = time.monotonic()

    def _write(self, plan: _Plan) -> SlideStatus:
        name = plan.spec.name
        try:
            if plan.failure is not None:
                plan.job.flush()  # what was embedded stays for the rerun
                return self._status(plan, FAILED, error=plan.failure)
            if not self.claims.still_mine(name):
                logger.warning("%s: its claim was taken over (a heartbeat older than the timeout?); writing it "
                               "anyway, complete or not at all", shown(plan.spec.path))
            tiles = plan.tiles
            bad = {s["path"] for s in plan.skipped}
            keep = np.array([i for i in range(len(tiles)) if tiles[i].name not in bad], dtype=np.int64)
            plan.job.finish([tiles[int(i)].name for i in keep], tiles.coords[keep], plan.skipped,
                            coords_attrs=tiles.attributes(), slide_pool=self.request["slide_pool"],
                            extra_provenance={"attributes": plan.spec.attributes} if plan.spec.attributes else None)
            if not len(keep):
                logger.warning("%s: no tile has enough tissue; %s holds no rows (attributes only)",
                               shown(plan.spec.path), shown(self.output_of(plan.spec)))
            return self._status(plan, DONE, tiles=len(keep), skipped=len(plan.skipped))
        except (H0miniError, OSError, ValueError) as error:
            return self._status(plan, FAILED, error=" ".join(str(error).split()))
        finally:
            self.claims.release(name)
            release(plan.spec.path)  # this process's handles and cached stored tiles (workers keep a few, LRU)
            plan.tiles, plan.pending, plan.job = None, [], None  # nothing of the slide outlives it

    def _status(self, plan: _Plan, status: str, *, tiles: int = 0, skipped: int = 0, error: str = "") -> SlideStatus:
        seconds = round(time.perf_counter() - plan.started, 2)
        target = self.output_of(plan.spec)
        return SlideStatus(
            plan.spec.path, status, tiles, skipped, seconds, str(target) if status in (DONE, ALREADY_DONE) else "",
            plan.qc or (str(self.out / "qc" / f"{plan.spec.name}.png")
                        if status == ALREADY_DONE and (self.out / "qc" / f"{plan.spec.name}.png").exists() else ""),
            error, plan.spec.name, socket.gethostname(), os.getpid(),
            datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )

    def _log(self, status: SlideStatus) -> None:
        if status.status == DONE:
            self._seconds.append(status.seconds)
        count = len(self.statuses)
        left = self._total - count
        eta = ""
        if self._seconds and left:
            eta = f"; ETA {_duration(left * sum(self._seconds) / len(self._seconds))} for {left} more"
        if status.status == DONE:
            what = f"done, {status.tiles} tiles in {status.seconds:.1f} s" + (
                f", {status.skipped_tiles} skipped" if status.skipped_tiles else "")
        elif status.status == ALREADY_DONE:
            what = f"already done ({status.tiles} tiles)"
        else:
            what = f"{status.status}: {status.error}"
        level = logging.ERROR if status.status == FAILED else logging.INFO
        logger.log(level, "[%d/%d] %s: %s%s", count, self._total, shown(status.slide), what, eta)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
