"""Atomic writes: permissions, fsync, stale temporaries, and kills at random moments."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pyro_backpass.files as files
from pyro_backpass.files import atomic_write, atomic_write_json, stale_temporaries

FILES_PY = Path(files.__file__)

# A writer that loads files.py on its own (no torch import: starts in ~30 ms) and saves version
# after version of a ~2 MB JSON file, in flushed pieces, so a kill lands mid-write.
_WRITER = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("files", sys.argv[1])
files = importlib.util.module_from_spec(spec); spec.loader.exec_module(files)
payload = "x" * 2_000_000
version = 0
while True:
    version += 1
    def write(tmp, version=version):
        text = json.dumps({"version": version, "data": payload})
        with open(tmp, "w") as f:
            for i in range(0, len(text), 65536):
                f.write(text[i : i + 65536]); f.flush()
    files.atomic_write(sys.argv[2], write)
"""

# The same with a real model checkpoint (imports torch: the slow variant).
_MODEL_WRITER = """
import sys
from pyro_backpass import GenerativeModel
gm = GenerativeModel.random([8, "M", 8, "M"], num_components=8, image_size=32)
while True:
    gm.save(sys.argv[1])
"""


def _temporaries(path: Path) -> list[str]:
    return [n for n in os.listdir(path.parent) if n.startswith(f".{path.name}.")]


def _valid_json(path: Path) -> bool:
    obj = json.loads(path.read_text())
    return obj["version"] >= 0 and len(obj["data"]) in (1, 2_000_000)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_mode_follows_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = atomic_write_json(tmp_path / "a.json", {"x": 1})
        plain = tmp_path / "plain.json"
        plain.write_text("{}")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask == plain.stat().st_mode & 0o777


def test_file_and_folder_are_fsynced(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}") if Path("/proc/self/fd").exists() else fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    path = atomic_write_json(tmp_path / "a.json", {"x": 1})
    assert len(synced) == 2  # the temporary file before the rename, the folder after it
    if isinstance(synced[0], str):
        assert Path(synced[0]).name.startswith(".a.json.") and synced[1] == str(tmp_path)
    assert json.loads(path.read_text()) == {"x": 1}


def test_stale_temporaries_are_removed_on_the_next_write(tmp_path):
    target = tmp_path / "m.json"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    orphan = tmp_path / f".m.json.{dead.stdout.strip()}-abc123.tmp"  # a killed writer's
    legacy = tmp_path / ".m.json.k3j4h5.tmp"  # the naming before pids were recorded
    mine = tmp_path / f".m.json.{os.getpid()}-zzz.tmp"  # this process: maybe another thread
    other = tmp_path / ".other.json.1-x.tmp"  # another target's: never touched
    for p in (orphan, legacy, mine, other):
        p.write_text("partial")
    assert set(stale_temporaries(target)) == {orphan, legacy}
    atomic_write_json(target, {"x": 1})
    assert not orphan.exists() and not legacy.exists() and mine.exists() and other.exists()


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = atomic_write_json(tmp_path / "a.json", {"v": 1})

    def broken(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, broken)
    assert json.loads(target.read_text()) == {"v": 1} and _temporaries(target) == []


def _kill_rounds(cmd, target, rounds, delays, loads):
    """Kill ``cmd`` (which saves ``target`` in a loop) ``rounds`` times; after each kill the
    previous file loads; after the next save of our own no temporary file is left."""
    rng = random.Random(0)
    orphans = 0
    for _ in range(rounds):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(*delays))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert loads(target), "the file at the target did not load after a kill"
        orphans += bool(_temporaries(target))
        loads.save(target)
        assert _temporaries(target) == [], "a temporary file survived the next save"
        assert loads(target)
    return orphans


class _Json:
    def __call__(self, path):
        return _valid_json(path)

    def save(self, path):
        atomic_write_json(path, {"version": 0, "data": "x"})


def test_killed_writes_never_damage_the_file(tmp_path):
    target = tmp_path / "result.json"
    atomic_write_json(target, {"version": 0, "data": "x"})
    cmd = [sys.executable, "-c", _WRITER, str(FILES_PY), str(target)]
    orphans = _kill_rounds(cmd, target, 25, (0.03, 0.25), _Json())
    assert orphans >= 5  # the kills did land mid-write (this is what the test is about)


@pytest.mark.slow
def test_killed_model_saves_never_damage_the_checkpoint(tmp_path):
    from pyro_backpass import GenerativeModel

    gm = GenerativeModel.random([8, "M", 8, "M"], num_components=8, image_size=32)

    class Model:
        def __call__(self, path):
            return GenerativeModel.load(path).num_components == gm.num_components

        def save(self, path):
            gm.save(path)

    target = tmp_path / "model.safetensors"
    gm.save(target)
    cmd = [sys.executable, "-c", _MODEL_WRITER, str(target)]
    # The writer imports torch first (~2-4 s here), then saves in a loop.
    _kill_rounds(cmd, target, 20, (2.0, 5.0), Model())
