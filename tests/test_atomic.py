"""Temporary files: a later run removes what dead writers left, and never what a live writer elsewhere holds."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from h0mini import atomic
from h0mini.atomic import atomic_path, machine_tag, remove_stale_temp


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _age(path: Path, seconds: float) -> None:
    os.utime(path, (time.time() - seconds, time.time() - seconds))


def test_a_temporary_name_says_which_process_on_which_machine_writes_it(tmp_path):
    target = tmp_path / "slide.h5"
    with atomic_path(target) as tmp:
        assert re.fullmatch(rf"\.slide\.h5\.{os.getpid()}-{machine_tag()}-[0-9a-f]{{8}}\.tmp", tmp.name)
        assert remove_stale_temp(target) == [] and tmp.exists(), "a live writer's file is kept"
        tmp.write_bytes(b"rows")
    assert target.read_bytes() == b"rows" and [p.name for p in tmp_path.iterdir()] == ["slide.h5"]


def test_leftovers_of_this_machine_are_judged_by_pid_and_of_other_machines_by_age(tmp_path):
    target = tmp_path / "s.h5"
    me, elsewhere = machine_tag(), "0badc0de"
    files = {
        "dead here": tmp_path / f".s.h5.{_dead_pid()}-{me}-00000001.tmp",
        "alive here": tmp_path / f".s.h5.{os.getppid()}-{me}-00000002.tmp",
        # Another node on the shared file system: its pid means nothing here, its file's age does.
        "writing elsewhere": tmp_path / f".s.h5.{_dead_pid()}-{elsewhere}-00000003.tmp",
        "abandoned elsewhere": tmp_path / f".s.h5.{os.getppid()}-{elsewhere}-00000004.tmp",
        "older version, dead": tmp_path / f".s.h5.{_dead_pid()}-0a1b2c3d.tmp",
        "another output": tmp_path / f".t.h5.{_dead_pid()}-{me}-00000005.tmp",
        # s.h5.json's temporary (an .npy's sidecar is NAME.json) starts with ".s.h5." too: not s.h5's.
        "a longer name's": tmp_path / f".s.h5.json.{_dead_pid()}-{me}-00000006.tmp",
    }
    for path in files.values():
        path.write_bytes(b"")
    _age(files["abandoned elsewhere"], atomic.FOREIGN_TEMP_TIMEOUT + 60)
    _age(files["writing elsewhere"], 60)  # written a minute ago: a pause between two writes
    removed = remove_stale_temp(target)
    assert sorted(removed) == sorted(files[k] for k in ("dead here", "abandoned elsewhere", "older version, dead"))
    assert all(files[k].exists() for k in ("alive here", "writing elsewhere", "another output", "a longer name's"))


def test_another_machines_leftover_is_aged_on_the_file_systems_clock(tmp_path, monkeypatch):
    target = tmp_path / "s.h5"
    fresh = tmp_path / f".s.h5.{_dead_pid()}-0badc0de-00000001.tmp"
    fresh.write_bytes(b"")
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 2 * atomic.FOREIGN_TEMP_TIMEOUT)  # this clock runs ahead
    assert remove_stale_temp(target) == [] and fresh.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".h0mini-clock")], "the clock probe is removed"


def test_two_nodes_with_one_host_name_or_one_node_rebooted_are_other_machines(monkeypatch):
    import io
    import socket

    real_open = open

    def booted(boot_id):
        def fake_open(path, *args, **kwargs):
            if str(path) == "/proc/sys/kernel/random/boot_id":
                return io.StringIO(boot_id + "\n")
            return real_open(path, *args, **kwargs)
        return fake_open

    monkeypatch.setattr(socket, "gethostname", lambda: "ubuntu")  # cloned nodes, one name
    tags = []
    try:
        for boot_id in ("11111111-aaaa", "22222222-bbbb", "11111111-aaaa"):
            monkeypatch.setattr(atomic, "open", booted(boot_id), raising=False)
            machine_tag.cache_clear()
            tags.append(machine_tag())
    finally:
        monkeypatch.undo()
        machine_tag.cache_clear()
    assert tags[0] != tags[1] and tags[0] == tags[2]


def test_an_absurd_file_system_stamp_is_not_taken_for_its_clock(tmp_path, monkeypatch):
    real = os.fstat

    def unflushed(fd):  # a FUSE mount that stamps a new file 0 until it is flushed
        result = real(fd)
        return os.stat_result(result[:8] + (0, 0))

    assert abs(atomic.filesystem_now(tmp_path) - time.time()) < 5  # this file system stamps now
    monkeypatch.setattr(atomic.os, "fstat", unflushed)
    assert abs(atomic.filesystem_now(tmp_path) - time.time()) < 5  # this machine's clock, not 1970
