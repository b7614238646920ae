"""Cohorts: many slides, several real processes on one folder, kill -9 and rerun, claims, manifests, resume rules."""

from __future__ import annotations

import csv
import gc
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import h0mini
from h0mini.cli import main
from h0mini.errors import SettingsMismatchError
from h0mini.wsi import ManifestError, SlideSpec, read_manifest, resolve_shard
from h0mini.wsi.claims import Claims, Owner, _read
from h0mini.wsi.summary import SlideStatus, read_summary, update_summary
from h0mini.writers import check_writable, read_embeddings
from helpers import SLIDE, write_checkpoint

tifffile = pytest.importorskip("tifffile")
pytest.importorskip("openslide")
pytest.importorskip("scipy")

RUN = ["--tissue", "none", "--num-workers", "0", "--batch-size", "1", "--precision", "fp32", "--no-qc"]


@pytest.fixture(autouse=True)
def _heartbeats_end_with_their_test(monkeypatch):
    """Every Claims a test makes in this process gives back its claims at the end, so no heartbeat
    thread outlives its test (and none is counted by the next one)."""
    made = []
    init = Claims.__init__

    def recording(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(Claims, "__init__", recording)
    yield
    for claims in made:
        claims.release_all()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    write_checkpoint(folder)
    return folder


def write_slide(path: Path, seed: int, size: int = 448, mpp: float = 0.5) -> Path:
    """A small tiled TIFF at ``mpp`` cut from the CC0 slide's tissue (each seed a different place)."""
    image = Image.open(SLIDE)
    image.seek(0)
    pixels = np.asarray(image.convert("RGB"))
    x, y = 300 + (seed * 97) % 1300, 300 + (seed * 131) % 2000
    tifffile.imwrite(path, pixels[y:y + size, x:x + size].copy(), tile=(256, 256), compression="zlib",
                     photometric="rgb", resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    return path


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cohort")
    for i in range(12):
        write_slide(folder / f"slide{i:02d}.tif", i)
    return folder


@pytest.fixture(scope="module")
def reference(cohort, checkpoint, tmp_path_factory):
    """One uninterrupted single-process run: what every other run must reproduce exactly."""
    out = tmp_path_factory.mktemp("reference")
    assert main(["embed-slides", str(cohort), "-o", str(out), "--weights", str(checkpoint), *RUN, "-q"]) == 0
    return out


def command(cohort: Path, out: Path, checkpoint: Path, *extra: str) -> list:
    return [sys.executable, "-m", "h0mini", "embed-slides", str(cohort), "-o", str(out), "--weights",
            str(checkpoint), *RUN, "--save-every", "1", *extra]


def environment() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(h0mini.__file__).parent.parent))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_ARRAY_TASK_ID"):
        env.pop(name, None)
    return env


def assert_same_outputs(reference: Path, out: Path, tiles: int = 4) -> None:
    names = sorted(p.name for p in reference.glob("*.h5"))
    assert sorted(p.name for p in out.glob("*.h5")) == names
    for name in names:
        a, b = read_embeddings(reference / name), read_embeddings(out / name)
        assert a.tile_names == b.tile_names and len(a) == tiles
        np.testing.assert_array_equal(a.coords, b.coords)
        # fp32, one tile per forward pass: a tile's numbers do not depend on what ran beside it.
        np.testing.assert_array_equal(a.arrays["features"], b.arrays["features"])


def assert_nothing_left_over(out: Path) -> None:
    assert not list(out.glob("*.parts")), "saved batches of finished slides are removed"
    assert not list((out / ".claims").iterdir()), "every claim is given back"
    assert not [p for p in out.rglob("*.tmp")], "no temporary file is left"


# -- several real processes on one folder ---------------------------------------------------------


@pytest.mark.parametrize("processes", [2, 3])
def test_processes_started_together_embed_each_slide_once(cohort, reference, checkpoint, tmp_path, processes):
    out = tmp_path / "out"
    runs = [subprocess.Popen(command(cohort, out, checkpoint), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=environment()) for _ in range(processes)]
    logs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0] * processes, [err[-1500:] for _, err in logs]
    done = [line for out_text, _ in logs for line in out_text.splitlines() if ": done, " in line]
    assert len(done) == 12 and len({line.split("]")[1].split(":")[0] for line in done}) == 12  # once each
    assert_same_outputs(reference, out)
    assert_nothing_left_over(out)
    rows = read_summary(out / "summary.csv")
    assert len(rows) == 12 and {r["status"] for r in rows.values()} == {"done"}


def _can_make_another_machine() -> bool:
    """Whether ``unshare`` can start a process with its own host name and pid namespace (root on Linux)."""
    try:
        probe = subprocess.run(["unshare", "--uts", "--pid", "--fork", "--mount-proc", "hostname", "node-b"],
                               capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


@pytest.mark.skipif(not _can_make_another_machine(), reason="needs unshare --uts --pid (root on Linux)")
def test_a_second_machine_killed_mid_run_is_taken_over_by_its_heartbeat(cohort, reference, checkpoint, tmp_path):
    """Another host on the shared folder: its own host name and pids, so only its heartbeat tells it is dead."""
    from h0mini.atomic import machine_tag

    out = tmp_path / "out"
    timeout = ["--claim-timeout", "3"]
    here = subprocess.Popen(command(cohort, out, checkpoint, *timeout), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=environment())
    node_b = subprocess.Popen(["unshare", "--uts", "--pid", "--fork", "--mount-proc", "sh", "-c",
                               'hostname node-b && exec "$@"', "sh", *command(cohort, out, checkpoint, *timeout)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment(),
                              start_new_session=True)
    def node_b_holds_a_claim() -> bool:
        return any((_read(p) or Owner("", 0, None, 0)).host == "node-b" for p in (out / ".claims").glob("*.*"))

    deadline = time.time() + 120
    while time.time() < deadline and not node_b_holds_a_claim():
        time.sleep(0.01)
    assert node_b_holds_a_claim(), "node-b never claimed a slide (else this test proves nothing)"
    os.killpg(node_b.pid, signal.SIGKILL)  # the whole machine: its pid 1 and everything under it
    node_b.wait()
    _, err = here.communicate(timeout=300)
    assert here.returncode == 0, err[-1500:]
    # Whatever node-b held is either taken over already (heartbeat older than 3 s) or left to the rerun.
    time.sleep(3.5)
    rerun = subprocess.run(command(cohort, out, checkpoint, *timeout), capture_output=True, text=True, timeout=300,
                           env=environment())
    assert rerun.returncode == 0, rerun.stderr[-1500:]
    assert_same_outputs(reference, out)
    assert not list(out.glob("*.parts")) and not list((out / ".claims").iterdir())
    leftovers = [p for p in out.rglob("*.tmp") if f"-{machine_tag()}-" in p.name]
    assert not leftovers, "this machine's temporaries are gone; node-b's (if any) wait out their hour"
    rows = read_summary(out / "summary.csv")
    assert len(rows) == 12 and {r["status"] for r in rows.values()} == {"done"}


@pytest.fixture(scope="module")
def bigger_cohort(tmp_path_factory, checkpoint):
    """6 slides of 16 tiles, and their uninterrupted single-process outputs."""
    folder = tmp_path_factory.mktemp("bigger")
    for i in range(6):
        write_slide(folder / f"slide{i:02d}.tif", i, size=896)
    out = tmp_path_factory.mktemp("bigger-reference")
    assert main(["embed-slides", str(folder), "-o", str(out), "--weights", str(checkpoint), *RUN, "-q"]) == 0
    return folder, out


def test_reader_workers_serve_slide_after_slide(cohort, reference, checkpoint, tmp_path):
    out = tmp_path / "out"
    statuses = h0mini.embed_slides([cohort], h0mini.load_model(checkpoint), output_dir=out, tissue=None,
                                   num_workers=2, batch_size=1, precision="fp32", qc=False, progress=False)
    assert [s.status for s in statuses] == ["done"] * 12
    assert_same_outputs(reference, out)


def test_kill_9_at_random_moments_then_a_rerun_equals_an_uninterrupted_run(bigger_cohort, checkpoint, tmp_path):
    cohort, reference = bigger_cohort
    out = tmp_path / "out"
    rng = random.Random(21)
    killed_mid_slide = 0
    for _ in range(4):  # rounds of two processes, each killed at a random moment after embedding began
        if len(list(out.glob("*.h5"))) == 6:
            break
        runs = [subprocess.Popen(command(cohort, out, checkpoint), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, env=environment()) for _ in range(2)]
        deadline = time.time() + 60
        while not list(out.glob("*.parts/part-*.npz")) and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.5))
        for run in runs:
            run.send_signal(signal.SIGKILL)
        for run in runs:
            run.wait()
        killed_mid_slide += bool(list(out.glob("*.parts/part-*.npz")))
    assert killed_mid_slide, "at least one kill left a slide half done (else this test proves nothing)"
    assert list((out / ".claims").iterdir()), "the killed processes left claims behind, to be taken over"
    finished = subprocess.run(command(cohort, out, checkpoint), capture_output=True, text=True, timeout=300,
                              env=environment())
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert_same_outputs(reference, out, tiles=16)
    assert_nothing_left_over(out)


# -- claims ------------------------------------------------------------------------------------------


def test_a_claim_is_held_once_and_a_dead_owners_claim_is_taken_over(tmp_path):
    first, second = Claims(tmp_path), Claims(tmp_path)
    assert first.acquire("s1") is None  # this process holds it now
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / ".claims" / "s2.1").write_text(json.dumps(
        {"host": first.me.host, "pid": pid, "process_start": None, "started": time.time()}))
    assert second.acquire("s2") is None, "a claim whose pid is gone is taken over"
    assert sorted(p.name for p in (tmp_path / ".claims").iterdir()) == ["s1.1", "s2.2"]
    live = Owner(first.me.host, os.getppid(), None, time.time())  # alive: our parent
    (tmp_path / ".claims" / "s3.1").write_text(json.dumps(live.__dict__))
    assert second.acquire("s3") == live, "a live owner keeps its slide"
    first.release_all()
    assert not (tmp_path / ".claims" / "s1.1").exists()


def test_another_hosts_claim_counts_as_dead_only_after_the_timeout(tmp_path):
    claims = Claims(tmp_path, timeout=60)
    path = tmp_path / ".claims" / "s1.4"
    path.parent.mkdir()
    path.write_text(json.dumps({"host": "node-elsewhere", "pid": 1, "process_start": None, "started": 0}))
    assert claims.acquire("s1") is not None  # heartbeat fresh: still theirs
    os.utime(path, (time.time() - 120, time.time() - 120))
    assert claims.acquire("s1") is None and _read(tmp_path / ".claims" / "s1.5").host == claims.me.host


def test_racing_takeovers_have_exactly_one_winner(tmp_path):
    path = tmp_path / ".claims" / "s1.1"
    path.parent.mkdir()
    path.write_text(json.dumps({"host": "gone", "pid": 1, "process_start": None, "started": 0}))
    os.utime(path, (0, 0))
    results = []
    barrier = threading.Barrier(8)

    def take():
        claims = Claims(tmp_path, timeout=1)
        claims.me = Owner(claims.me.host, claims.me.pid, None, time.time())
        barrier.wait()
        results.append(claims.acquire("s1"))

    threads = [threading.Thread(target=take) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results.count(None) == 1  # one new owner; the others see it alive


def test_write_probes_of_many_processes_never_collide(tmp_path):
    script = ("import sys; from pathlib import Path; from h0mini.writers import check_writable\n"
              "for _ in range(1000): check_writable(Path(sys.argv[1]), folder=True)\n")
    runs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stderr=subprocess.PIPE, text=True,
                             env=environment()) for _ in range(4)]
    errors = [run.communicate(timeout=120)[1] for run in runs]
    assert [run.returncode for run in runs] == [0] * 4, errors
    assert not list(tmp_path.iterdir())
    check_writable(tmp_path, folder=True)


# -- shards from schedulers --------------------------------------------------------------------------


def test_srun_arrays_and_torchrun_compose_and_every_slide_is_walked():
    slides = [f"s{i:02d}" for i in range(10)]
    srun = [resolve_shard(environ={"SLURM_PROCID": str(k), "SLURM_NTASKS": "4", "SLURM_LOCALID": str(k % 2)})
            for k in range(4)]
    assert [(s.index, s.count, s.origin, s.local_rank) for s in srun] == [
        (0, 4, "srun", 0), (1, 4, "srun", 1), (2, 4, "srun", 0), (3, 4, "srun", 1)]
    assert sorted(x for s in srun for x in s.select(slides)) == slides
    # A SLURM array of 3 tasks, each running torchrun with 2 ranks: 6 shares.
    composed = [resolve_shard(environ={"SLURM_ARRAY_TASK_ID": str(a), "SLURM_ARRAY_TASK_COUNT": "3",
                                       "SLURM_ARRAY_TASK_MIN": "0", "RANK": str(r), "WORLD_SIZE": "2",
                                       "LOCAL_RANK": str(r)}) for a in range(3) for r in range(2)]
    assert [(s.index, s.count) for s in composed] == [(i, 6) for i in range(6)]
    assert composed[0].origin == "slurm-array+torchrun"
    # --array=1,3,7: ids past the count fold in; nothing fails, and each process walks every slide.
    sparse = [resolve_shard(environ={"SLURM_ARRAY_TASK_ID": str(i), "SLURM_ARRAY_TASK_COUNT": "3",
                                     "SLURM_ARRAY_TASK_MIN": "1"}) for i in (1, 3, 7)]
    for shard in sparse:
        assert sorted(shard.order(slides)) == slides and shard.order(slides)[:1] == shard.select(slides)[:1]
    assert resolve_shard("1/3").order(slides) == resolve_shard("1/3").select(slides)  # asked for: only that share


def test_srun_tasks_on_one_folder_embed_everything_once(cohort, reference, checkpoint, tmp_path):
    out = tmp_path / "out"
    runs = [subprocess.Popen(command(cohort, out, checkpoint), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=dict(environment(), SLURM_PROCID=str(k), SLURM_NTASKS="2"))
            for k in range(2)]
    logs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-1500:] for _, err in logs]
    first = logs[0][0].splitlines()[0]
    assert first.startswith("[1/12]") and "slide00.tif" in first  # task 0 starts with its own share (done or
    # already claimed by task 1, had task 1 finished its share and come to help first)
    assert_same_outputs(reference, out)


# -- manifests -----------------------------------------------------------------------------------------


def test_a_manifest_gives_each_slide_its_mpp_mask_name_and_attributes(tmp_path, checkpoint):
    slides = tmp_path / "slides"
    slides.mkdir()
    write_slide(slides / "a.tif", 1)
    write_slide(slides / "b.tif", 2, mpp=0.25)  # metadata says 0.25: the manifest corrects it to 0.5
    mask = np.zeros((448, 448), np.uint8)
    mask[:224, :224] = 255  # one tile of tissue
    Image.fromarray(mask).save(slides / "a_mask.png")
    manifest = tmp_path / "cohort.csv"
    manifest.write_text("slide,mpp,mask,name,patient\nslides/a.tif,,slides/a_mask.png,case-a,P1\n"
                        "slides/b.tif,0.5,,case-b,P2\n")
    out = tmp_path / "out"
    assert main(["embed-slides", str(manifest), "-o", str(out), "--weights", str(checkpoint), "--num-workers", "0",
                 "--tissue", "none", "--no-qc", "-q"]) == 0
    a, b = read_embeddings(out / "case-a.h5"), read_embeddings(out / "case-b.h5")
    assert len(a) == 1 and a.coords.tolist() == [[0, 0]]
    assert len(b) == 4 and b.coords_attrs["level0_mpp"] == 0.5 and b.coords_attrs["read_size"] == 224
    assert a.provenance["attributes"] == {"patient": "P1"} and b.provenance["attributes"] == {"patient": "P2"}
    assert a.provenance["tiling"]["tissue"]["method"] == "user mask"


def test_bad_manifest_rows_are_listed_together_before_anything_runs(tmp_path):
    write_slide(tmp_path / "a.tif", 1)
    manifest = tmp_path / "cohort.csv"
    manifest.write_text("slide,mpp,mask,name\na.tif,0,,\nmissing.svs,,,\na.tif,0.5,nomask.png,x\n,,,\n"
                        "a.tif,,,x\n")
    with pytest.raises(ManifestError) as caught:
        read_manifest(manifest)
    message = str(caught.value)
    for expected in ("line 2: mpp must be a positive number", "line 3: missing.svs: no such file",
                     "line 4: mask nomask.png: no such file", "line 5: the 'slide' cell is empty",
                     "a.tif is listed twice"):
        assert expected in message, message
    with pytest.raises(ManifestError, match="no 'slide' column"):
        (tmp_path / "bad.csv").write_text("path\na.tif\n")
        read_manifest(tmp_path / "bad.csv")


def test_name_clashes_are_named_before_the_model_loads(tmp_path, capsys):
    write_slide(tmp_path / "plain.tif", 1)
    write_slide(tmp_path / "plain.tiff", 2)
    assert main(["embed-slides", str(tmp_path), "-o", str(tmp_path / "out"), "--weights", "/nonexistent"]) == 1
    err = capsys.readouterr().err
    assert "plain.tif" in err and "plain.tiff" in err and "would both write plain.h5" in err


# -- resume decisions ------------------------------------------------------------------------------------


def test_a_rescanned_slide_or_other_settings_are_refused_and_overwrite_replaces(tmp_path, checkpoint, capsys):
    slides = tmp_path / "slides"
    slides.mkdir()
    write_slide(slides / "s1.tif", 1)
    out = tmp_path / "out"
    base = ["embed-slides", str(slides), "-o", str(out), "--weights", str(checkpoint), *RUN]
    assert main(base) == 0
    before = read_embeddings(out / "s1.h5").arrays["features"]
    write_slide(slides / "s1.tif", 5)  # another slide under the same name
    capsys.readouterr()
    assert main(base) == 1
    err = capsys.readouterr().err
    assert "was made with other settings" in err and "slide.mtime" in err and "--overwrite" in err
    np.testing.assert_array_equal(read_embeddings(out / "s1.h5").arrays["features"], before)  # nothing deleted
    assert main(base + ["--overwrite"]) == 0
    assert not np.array_equal(read_embeddings(out / "s1.h5").arrays["features"], before)
    assert main(base + ["--precision", "bf16"]) == 1  # the last --precision wins
    assert "precision: saved 'fp32', now 'bf16'" in capsys.readouterr().err
    assert main(base + ["--target-mpp", "1.0"]) == 1
    assert "request.target_mpp: saved 0.5, now 1.0" in capsys.readouterr().err


def test_saved_batches_of_other_settings_are_kept_and_named(tmp_path, checkpoint):
    slides = tmp_path / "slides"
    slides.mkdir()
    write_slide(slides / "s1.tif", 1)
    out = tmp_path / "out"
    model = h0mini.load_model(checkpoint)

    class Stop(Exception):
        pass

    embedder_calls = {"n": 0}
    original = h0mini.TileEmbedder._embed_pixels

    def failing(self, pixels):
        embedder_calls["n"] += 1
        if embedder_calls["n"] == 3:
            raise Stop
        return original(self, pixels)

    h0mini.TileEmbedder._embed_pixels = failing
    try:
        with pytest.raises(Stop):
            h0mini.embed_slides([slides], model, output_dir=out, tissue=None, num_workers=0, batch_size=1,
                                precision="fp32", save_every=1, qc=False, progress=False)
    finally:
        h0mini.TileEmbedder._embed_pixels = original
    parts = sorted((out / "s1.h5.parts").glob("part-*.npz"))
    assert len(parts) == 2
    with pytest.raises(SettingsMismatchError, match="precision: saved 'fp32', now 'bf16'"):
        h0mini.embed_slides([slides], model, output_dir=out, tissue=None, num_workers=0, precision="bf16",
                            qc=False, progress=False)
    assert sorted((out / "s1.h5.parts").glob("part-*.npz")) == parts  # kept
    statuses = h0mini.embed_slides([slides], model, output_dir=out, tissue=None, num_workers=0, batch_size=1,
                                   precision="fp32", qc=False, progress=False)
    assert [(s.status, s.tiles) for s in statuses] == [("done", 4)]


def test_an_in_memory_model_resumes_by_its_weights(tmp_path, checkpoint):
    import timm

    slides = tmp_path / "slides"
    slides.mkdir()
    write_slide(slides / "s1.tif", 1)
    out = tmp_path / "out"
    model = timm.create_model("h0mini_test", pretrained=False)
    options = dict(output_dir=out, tissue=None, num_workers=0, precision="fp32", qc=False, progress=False)
    assert [s.status for s in h0mini.embed_slides([slides], model, **options)] == ["done"]
    assert [s.status for s in h0mini.embed_slides([slides], model, **options)] == ["already done"]
    with torch_no_grad():
        next(model.parameters()).add_(1.0)  # fine-tuned a step further: not the same numbers
    with pytest.raises(SettingsMismatchError, match="weights_sha256"):
        h0mini.embed_slides([slides], model, **options)


def torch_no_grad():
    import torch

    return torch.no_grad()


# -- memory, report and signals ------------------------------------------------------------------------


def test_many_slides_keep_few_handles_and_flat_memory(tmp_path, checkpoint):
    slides = tmp_path / "slides"
    slides.mkdir()
    for i in range(40):
        write_slide(slides / f"s{i:02d}.tif", i, size=224)
    model = h0mini.load_model(checkpoint)
    options = dict(tissue=None, num_workers=0, qc=True, progress=False, batch_size=4)

    def open_files():
        return len(os.listdir("/proc/self/fd"))

    from h0mini.wsi import cohort as cohort_module
    from h0mini.wsi.grid import SlideTiles

    alive = []  # slides whose tiling is still in memory, counted as each slide ends
    finish = cohort_module._Cohort._finish_ready

    def counting(self, received, bar):
        gc.collect()
        alive.append(sum(1 for o in gc.get_objects() if isinstance(o, SlideTiles)))
        finish(self, received, bar)

    before = open_files()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cohort_module._Cohort, "_finish_ready", counting)
        statuses = h0mini.embed_slides(sorted(slides.glob("s0*.tif")) + sorted(slides.glob("s1*.tif")), model,
                                       output_dir=tmp_path / "a", **options)
        after_20 = open_files()
        statuses += h0mini.embed_slides([slides], model, output_dir=tmp_path / "b", **options)
    after_60 = open_files()
    assert [s.status for s in statuses] == ["done"] * 60
    assert after_60 - before <= 8 and after_60 <= after_20 + 2, (before, after_20, after_60)
    # Memory: nothing of a finished slide outlives it. Alive at a slide's end: the slides of the batch
    # in hand (1-tile slides, batches of 4), those planned ahead (LOOKAHEAD) and the one being
    # planned, plus one of slack for a batch read ahead; the same bound for 20 slides or 40.
    assert len(alive) >= 15 and max(alive) <= 4 + cohort_module.LOOKAHEAD + 2, alive
    gc.collect()
    assert not [o for o in gc.get_objects() if isinstance(o, SlideTiles)], "no tiling outlives its run"


def test_quiet_prints_nothing_on_success_and_the_summary_keeps_every_run(tmp_path, checkpoint, capfd):
    slides = tmp_path / "slides"
    slides.mkdir()
    write_slide(slides / "s1.tif", 1)
    out = tmp_path / "out"
    assert main(["embed-slides", str(slides), "-o", str(out), "--weights", str(checkpoint), *RUN, "-q"]) == 0
    assert capfd.readouterr() == ("", "")
    (slides / "s2.tif").write_bytes(b"not a slide")
    assert main(["embed-slides", str(slides), "-o", str(out), "--weights", str(checkpoint), *RUN, "-q"]) == 1
    captured = capfd.readouterr()
    assert captured.out == "" and "s2.tif" in captured.err and "1 failed" in captured.err
    rows = read_summary(out / "summary.csv")
    assert {k: r["status"] for k, r in rows.items()} == {"s1": "done", "s2": "failed"}  # the first run's row stays


def test_an_empty_share_still_writes_a_summary(tmp_path, checkpoint):
    slides = tmp_path / "slides"
    slides.mkdir()
    write_slide(slides / "s1.tif", 1)
    out = tmp_path / "out"
    assert main(["embed-slides", str(slides), "-o", str(out), "--weights", str(checkpoint), *RUN, "--shard", "1/2",
                 "-q"]) == 0
    assert (out / "summary.csv").read_text().startswith("slide,status,")


def test_a_claimed_row_never_hides_the_owners_row(tmp_path):
    update_summary(tmp_path, [SlideStatus("/s/a.svs", "done", 5, name="a")])
    update_summary(tmp_path, [SlideStatus("/s/a.svs", "claimed by another process", name="a")])
    assert read_summary(tmp_path / "summary.csv")["a"]["status"] == "done"


def test_sigterm_saves_the_batches_and_exits_130(cohort, checkpoint, tmp_path):
    out = tmp_path / "out"
    run = subprocess.Popen(command(cohort, out, checkpoint), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env=environment())
    deadline = time.time() + 60
    while not list(out.glob("*.h5")) and time.time() < deadline:
        time.sleep(0.02)
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert not list((out / ".claims").iterdir())  # claims given back on the way out


def test_skipped_tiles_are_named_with_coordinates_and_a_raise_rerun_retries_them(tmp_path, checkpoint, monkeypatch):
    from h0mini.errors import SlideError
    from h0mini.wsi.grid import SlideRegion

    slides = tmp_path / "slides"
    slides.mkdir()
    write_slide(slides / "s1.tif", 1)
    model = h0mini.load_model(checkpoint)
    options = dict(output_dir=tmp_path / "out", tissue=None, num_workers=0, batch_size=1, precision="fp32",
                   qc=False, progress=False)
    reference = h0mini.embed_slides([slides], model, **dict(options, output_dir=tmp_path / "reference"))
    original = SlideRegion.load

    def unreadable_corner(self):
        if self.coords == (224, 224):
            raise SlideError("cannot read 224x224 px at level 0, (224, 224): corrupt tile", slide=self.source.path)
        return original(self)

    monkeypatch.setattr(SlideRegion, "load", unreadable_corner)
    first = h0mini.embed_slides([slides], model, on_error="skip", **options)
    assert [(s.status, s.tiles, s.skipped_tiles) for s in first] == [("done", 3, 1)]
    saved = read_embeddings(tmp_path / "out" / "s1.h5")
    assert "x=224, y=224" in saved.skipped[0]["reason"] and [224, 224] not in saved.coords.tolist()
    assert [s.status for s in h0mini.embed_slides([slides], model, on_error="skip", **options)] == ["already done"]
    still_bad = h0mini.embed_slides([slides], model, on_error="raise", **options)
    assert still_bad[0].status == "failed" and "x=224, y=224" in still_bad[0].error
    assert len(read_embeddings(tmp_path / "out" / "s1.h5")) == 3  # the saved output is kept
    monkeypatch.setattr(SlideRegion, "load", original)  # the tile reads again (a flaky disk, a repaired file)
    retried = h0mini.embed_slides([slides], model, on_error="raise", **options)
    assert [(s.status, s.tiles) for s in retried] == [("done", 4)] and reference[0].tiles == 4
    assert_same_outputs(tmp_path / "reference", tmp_path / "out")


def test_on_a_cpu_tiles_are_decoded_in_a_thread_by_default(checkpoint):
    from h0mini.tiles import TileInput

    embedder = h0mini.TileEmbedder(h0mini.load_model(checkpoint), device="cpu")
    cohort_stream = TileInput(iter(()), single=False, length=None, all_paths=True)
    many_files = TileInput(["a.png"] * 10_000, single=False, length=10_000, all_paths=True)
    # Measured (benchmarks/cohort.py, 2 cores): one worker process ran 5-7x slower than the thread.
    assert embedder._workers(cohort_stream) == 0 and embedder._workers(many_files) == 0
    assert h0mini.TileEmbedder(embedder.model, device="cpu", num_workers=2)._workers(many_files) == 2


def test_a_manifest_row_naming_one_dcm_file_stands_for_its_dicom_folder(tmp_path):
    pytest.importorskip("pydicom")
    from wsi_files import write_dicom_wsi

    image = Image.open(SLIDE)
    image.seek(0)
    write_dicom_wsi(tmp_path / "case-7", np.asarray(image.convert("RGB"))[:448, :448].copy(), mpp=0.5)
    one_file = sorted((tmp_path / "case-7").glob("*.dcm"))[0]
    (tmp_path / "cohort.csv").write_text(f"slide\n{one_file}\n")
    [spec] = read_manifest(tmp_path / "cohort.csv")
    assert spec.path == str(tmp_path / "case-7") and spec.name == "case-7"


# -- review: resume on an edited mask, a slide that fails after tiling, a planner bug --------------------


def test_an_edited_mask_is_not_already_done(tmp_path, checkpoint):
    slides = tmp_path / "slides"
    slides.mkdir()
    write_slide(slides / "a.tif", 1)
    mask = np.zeros((448, 448), np.uint8)
    mask[:224, :224] = 255
    Image.fromarray(mask).save(slides / "a_mask.png")
    manifest = tmp_path / "cohort.csv"
    manifest.write_text("slide,mask\nslides/a.tif,slides/a_mask.png\n")
    out = tmp_path / "out"
    run = ["embed-slides", str(manifest), "-o", str(out), "--weights", str(checkpoint), *RUN, "-q"]
    assert main(run) == 0 and len(read_embeddings(out / "a.h5")) == 1
    mask[:, :] = 255  # the mask was corrected: four tiles of tissue
    Image.fromarray(mask).save(slides / "a_mask.png")
    os.utime(slides / "a_mask.png", (time.time() + 5, time.time() + 5))
    assert main(run) == 1, "the saved output was made with the old mask"
    assert main(run + ["--overwrite"]) == 0 and len(read_embeddings(out / "a.h5")) == 4


def test_a_slide_failing_after_its_tiling_is_not_embedded_and_the_others_are(tmp_path, checkpoint, monkeypatch):
    from h0mini.wsi import cohort as cohort_module

    slides = tmp_path / "slides"
    slides.mkdir()
    write_slide(slides / "a.tif", 1)
    write_slide(slides / "b.tif", 2)
    routed = []
    original_add = cohort_module.OutputJob.add

    def add(job, names, features, part_size):
        routed.append(job.path.name)
        return original_add(job, names, features, part_size)

    def qc_fails(tiles, path):
        if "a" == Path(tiles.source.path).stem:
            raise OSError(28, "No space left on device")
        return Path(path)

    monkeypatch.setattr(cohort_module.OutputJob, "add", add)
    monkeypatch.setattr(cohort_module, "save_qc_image", qc_fails)
    out = tmp_path / "out"
    statuses = h0mini.embed_slides(slides, checkpoint, output_dir=out, tissue=None, num_workers=0, batch_size=1,
                                   precision="fp32", progress=False)
    assert [s.status for s in statuses] == ["failed", "done"]
    assert set(routed) == {"b.h5"}, "the failed slide's tiles are not embedded"
    assert not (out / "a.h5").exists() and not (out / "a.h5.parts").exists()


def test_a_bug_in_the_planner_is_raised_not_a_short_cohort(tmp_path, checkpoint, monkeypatch):
    from h0mini.wsi import cohort as cohort_module

    slides = tmp_path / "slides"
    slides.mkdir()
    write_slide(slides / "a.tif", 1)
    write_slide(slides / "b.tif", 2)

    def tile_slide(path, **kwargs):
        raise KeyError("a bug, not a bad slide")

    monkeypatch.setattr(cohort_module, "tile_slide", tile_slide)
    with pytest.raises(KeyError, match="a bug"):
        h0mini.embed_slides(slides, checkpoint, output_dir=tmp_path / "out", tissue=None, num_workers=0,
                            progress=False)


def test_a_claim_of_an_earlier_process_with_this_pid_is_taken_over_and_says_when_it_was_taken(tmp_path):
    claims = Claims(tmp_path)
    assert claims.me.process_start is not None  # Linux: /proc
    earlier = Owner(claims.me.host, os.getpid(), claims.me.process_start - 1000, 0.0)  # a restarted container
    (tmp_path / ".claims").mkdir()
    (tmp_path / ".claims" / "s1.1").write_text(json.dumps(earlier.__dict__))
    assert claims.acquire("s1") is None, "a dead incarnation's claim is not this process's"
    time.sleep(0.05)
    assert claims.acquire("s2") is None
    taken = [_read(tmp_path / ".claims" / n).started for n in ("s1.2", "s2.1")]
    assert taken[0] < taken[1] and claims.acquire("s1") is not None
    claims.release_all()


def test_a_signal_inside_release_leaves_the_claim_to_release_all(tmp_path, monkeypatch):
    from h0mini.wsi import claims as claims_module

    claims = Claims(tmp_path)
    assert claims.acquire("s1") is None
    real = claims_module._unlink
    calls = []

    def interrupted(path):
        calls.append(path)
        if len(calls) == 1:
            raise KeyboardInterrupt  # SIGTERM, raised by the command's handler, lands here
        real(path)

    monkeypatch.setattr(claims_module, "_unlink", interrupted)
    with pytest.raises(KeyboardInterrupt):
        claims.release("s1")
    claims.release_all()  # the run's finally
    assert not list((tmp_path / ".claims").iterdir())


def test_saved_batches_left_beside_a_complete_output_are_removed_on_the_next_run(tmp_path, checkpoint):
    slides = tmp_path / "slides"
    slides.mkdir()
    write_slide(slides / "s1.tif", 1)
    out = tmp_path / "out"
    run = ["embed-slides", str(slides), "-o", str(out), "--weights", str(checkpoint), *RUN, "-q"]
    assert main(run) == 0
    leftover = out / "s1.h5.parts"  # killed after the output's rename, before the batches' removal
    leftover.mkdir()
    (leftover / "part-host-1-abc-000001.npz").write_bytes(b"x" * 1000)
    assert main(run) == 0
    assert not leftover.exists() and len(read_embeddings(out / "s1.h5")) == 4
    assert not list((out / ".claims").iterdir())


def test_a_summary_that_cannot_be_written_does_not_stop_the_cohort(cohort, checkpoint, tmp_path, monkeypatch):
    from h0mini.wsi import cohort as cohort_module

    calls = {"n": 0}
    original = cohort_module.update_summary

    def flaky(output_dir, statuses):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(5, "Input/output error")  # a transient NFS error
        return original(output_dir, statuses)

    monkeypatch.setattr(cohort_module, "update_summary", flaky)
    monkeypatch.setattr(cohort_module, "SUMMARY_EVERY", 0.0)  # merge after every slide
    slides = sorted(cohort.glob("*.tif"))[:3]
    statuses = h0mini.embed_slides(slides, h0mini.load_model(checkpoint), output_dir=tmp_path / "out", tissue=None,
                                   num_workers=0, qc=False, progress=False)
    assert [s.status for s in statuses] == ["done"] * 3
    assert len(read_summary(tmp_path / "out" / "summary.csv")) == 3  # the missed row came with the next one


def test_a_container_sharing_the_host_name_is_judged_by_its_heartbeat(tmp_path):
    claims = Claims(tmp_path, timeout=60)
    path = tmp_path / ".claims" / "s1.1"
    path.parent.mkdir()
    # Same host name (host networking), a pid that does not exist here, another pid namespace: alive while it beats.
    path.write_text(json.dumps({"host": claims.me.host, "pid": 2**22 + 17, "process_start": None, "started": 0,
                                "pid_namespace": "pid:[1]"}))
    assert claims.acquire("s1") is not None
    os.utime(path, (time.time() - 120, time.time() - 120))
    assert claims.acquire("s1") is None


def test_summary_rows_are_merged_in_batches_and_all_saved_at_the_end(cohort, checkpoint, tmp_path, monkeypatch):
    from h0mini.wsi import cohort as cohort_module

    merges = []
    original = cohort_module.update_summary
    monkeypatch.setattr(cohort_module, "update_summary", lambda out, rows: (merges.append(len(rows)), original(out, rows)))
    monkeypatch.setattr(cohort_module, "SUMMARY_EVERY", 3600.0)
    slides = sorted(cohort.glob("*.tif"))[:4]
    h0mini.embed_slides(slides, h0mini.load_model(checkpoint), output_dir=tmp_path / "out", tissue=None,
                        num_workers=0, qc=False, progress=False)
    assert merges == [1, 3]  # the first slide at once, the rest at the end: not a rewrite per slide
    assert len(read_summary(tmp_path / "out" / "summary.csv")) == 4


def test_heartbeat_ages_are_read_on_the_file_systems_clock_not_this_machines(tmp_path, monkeypatch):
    claims = Claims(tmp_path, timeout=60)
    fresh, stale = tmp_path / ".claims" / "s1.1", tmp_path / ".claims" / "s2.1"
    fresh.parent.mkdir()
    for path in (fresh, stale):
        path.write_text(json.dumps({"host": "node-elsewhere", "pid": 1, "process_start": None, "started": 0}))
    os.utime(stale, (time.time() - 120, time.time() - 120))  # its owner stopped beating two minutes ago
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600)  # this machine's clock an hour ahead of the server's
    assert claims.acquire("s1") is not None, "a fresh heartbeat is fresh whatever this machine's clock says"
    monkeypatch.setattr(time, "time", lambda: real() - 3600)  # and an hour behind
    assert claims.acquire("s2") is None, "a stale heartbeat is stale whatever this machine's clock says"
    claims.release_all()


def test_a_claim_contended_past_every_retry_is_never_reported_as_this_processs(tmp_path, monkeypatch):
    claims = Claims(tmp_path, timeout=60)
    path = tmp_path / ".claims" / "s1.1"
    path.parent.mkdir()
    path.write_text(json.dumps({"host": "gone", "pid": 1, "process_start": None, "started": 0}))
    os.utime(path, (0, 0))  # dead: every round tries a takeover
    monkeypatch.setattr(claims, "_create", lambda target: False)  # and every round someone else is faster
    owner = claims.acquire("s1")
    assert owner is not None and owner != claims.me
    assert "another process" in owner.describe() and str(os.getpid()) not in owner.describe()


def test_a_second_sigterm_during_the_clean_up_loses_no_batch_and_leaves_no_claim(cohort, checkpoint, tmp_path,
                                                                                 monkeypatch):
    from h0mini.job import OutputJob
    from h0mini.wsi import cohort as cohort_module

    routed = []
    route, flush, release = cohort_module._Cohort._route, OutputJob.flush, Claims.release

    def route_then_first_sigterm(self, batch):
        route(self, batch)
        routed.append(len(batch.indices))
        if len(routed) == 6:  # slide00 written, slide01 half embedded and only in memory
            raise KeyboardInterrupt  # what the command's SIGTERM handler raises

    def second_sigterm_then_flush(self):
        if len(routed) >= 6:
            os.kill(os.getpid(), signal.SIGTERM)
        flush(self)

    def third_sigterm_then_release(self, name):
        if len(routed) >= 6:
            os.kill(os.getpid(), signal.SIGTERM)
        release(self, name)

    monkeypatch.setattr(cohort_module._Cohort, "_route", route_then_first_sigterm)
    monkeypatch.setattr(OutputJob, "flush", second_sigterm_then_flush)
    monkeypatch.setattr(Claims, "release", third_sigterm_then_release)
    out = tmp_path / "out"
    slides = sorted(str(p) for p in cohort.glob("*.tif"))[:5]
    assert main(["embed-slides", *slides, "-o", str(out), "--weights", str(checkpoint), *RUN, "--save-every", "100",
                 "-q"]) == 130
    assert len(read_embeddings(out / "slide00.h5")) == 4
    saved = sum(len(np.load(p)["tile_names"]) for p in (out / "slide01.h5.parts").glob("part-*.npz"))
    assert saved == sum(routed) - 4 == 2, "the rows held in memory were saved despite the second signal"
    assert not list((out / ".claims").iterdir()), "every claim was given back despite the third"


def test_a_clean_up_that_fails_still_gives_back_the_claims_and_stops_the_threads(cohort, checkpoint, tmp_path,
                                                                                 monkeypatch):
    from h0mini.job import OutputJob
    from h0mini.wsi import cohort as cohort_module

    route = cohort_module._Cohort._route
    routed = []

    def route_then_crash(self, batch):
        route(self, batch)
        routed.append(1)
        if len(routed) == 6:
            raise RuntimeError("the crash")

    def flush_fails(self):
        raise ValueError("saving failed too")  # not an OSError: not caught by the clean-up itself

    monkeypatch.setattr(cohort_module._Cohort, "_route", route_then_crash)
    monkeypatch.setattr(OutputJob, "flush", flush_fails)
    out = tmp_path / "out"
    before = set(threading.enumerate())  # other tests' Claims may still beat
    with pytest.raises(ValueError, match="saving failed too"):
        h0mini.embed_slides(sorted(cohort.glob("*.tif"))[:5], h0mini.load_model(checkpoint), output_dir=out,
                            tissue=None, num_workers=0, batch_size=1, qc=False, progress=False)
    assert not list((out / ".claims").iterdir()), "every claim was given back"

    def ours():
        return [t.name for t in set(threading.enumerate()) - before if t.name in ("h0mini-claims", "h0mini-planner")]

    deadline = time.time() + 15
    while time.time() < deadline and ours():
        time.sleep(0.05)
    assert not ours()


def test_nothing_is_claimed_after_release_all(tmp_path):
    """A planner thread the shut-down did not wait out (a slide planned for over 10 s) claims nothing more:
    that claim would never be given back, and its heartbeat would keep it alive in a Python session."""
    claims = Claims(tmp_path)
    assert claims.acquire("s1") is None
    claims.release_all()
    owner = claims.acquire("s2")
    assert owner is not None and owner != claims.me
    assert not list((tmp_path / ".claims").iterdir()) and not claims._held
    assert claims._stop.is_set(), "the heartbeat was not started again"


def test_the_file_systems_clock_is_read_once_a_minute_not_per_claim(tmp_path, monkeypatch):
    from h0mini.wsi import claims as claims_module

    readings = []
    real = claims_module.filesystem_now
    monkeypatch.setattr(claims_module, "filesystem_now", lambda folder: readings.append(1) or real(folder))
    claims = Claims(tmp_path, timeout=60)
    (tmp_path / ".claims").mkdir()
    for i in range(20):  # another host's live claims: each judged by its heartbeat's age
        (tmp_path / ".claims" / f"s{i}.1").write_text(json.dumps(
            {"host": "node-elsewhere", "pid": 1, "process_start": None, "started": 0}))
        assert claims.acquire(f"s{i}") is not None
    assert len(readings) == 1
    claims.release_all()
