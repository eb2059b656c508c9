"""The writer's lock taken without waiting (``_core._try_write_lock``): it excludes the writer and
other holders across processes for any file name, by the very code the writer locks with."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import latentcache as lc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from latentcache import _core

# A second process that takes and releases the lock on request: one JSON line in, one word out.
_HOLDER = textwrap.dedent(
    """
    import json, sys
    from latentcache import _core
    held = None
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "lock":
            held = _core._try_write_lock(req["path"])
            print("busy" if held is None else "held", flush=True)
        elif req["op"] == "release":
            if held is not None:
                held.release()
            held = None
            print("released", flush=True)
    """
)


class Holder:
    def __init__(self) -> None:
        root = str(Path(lc.__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _HOLDER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            env=env,
        )

    def ask(self, op: str, path: str = "") -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, "path": path}) + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(30)


@pytest.fixture(scope="module")
def holder() -> Iterator[Holder]:
    h = Holder()
    try:
        yield h
    finally:
        h.close()


_NOT_IN_NAMES = "/\\\x00"
_char = st.characters(exclude_categories=("Cs",), exclude_characters=_NOT_IN_NAMES)
# Names whose lower-cased forms differ between Python and Rust, or change length when cased.
_SPECIAL = [
    "\u1c89_0064x0064_anima.npz",
    "\u0130stanbul_0064x0064_anima.npz",
    "STRASSE_\u00df_0064x0064_anima.npz",
    "\u03a3\u039f\u03a6\u0399\u0391\u03a3_0064x0064_anima.npz",
    "\u1e9e_0064x0064_anima.npz",
    "A_0064x0064_ANIMA.NPZ",
]
_names = st.one_of(
    st.sampled_from(_SPECIAL),
    st.text(_char, min_size=1, max_size=40),
    # Over 220 bytes: the writer shards by a shortened stem (first 200 bytes, `~`, CRC-32).
    st.text(_char, min_size=1, max_size=40).map(lambda s: s + "\u00e9\u0416" * 60 + "_0064x0064_anima.npz"),
).filter(lambda n: n not in (".", ".."))


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("locks")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=_names)
def test_a_lock_held_in_another_process_excludes_this_one_and_back(
    holder: Holder, folder: Path, name: str
) -> None:
    target = os.path.join(folder, name)
    lock_file = _core._lock_path(target)
    assert os.path.dirname(lock_file) == os.path.join(folder, ".latentcache-locks")
    assert holder.ask("lock", target) == "held"
    assert os.path.isfile(lock_file)
    assert _core._try_write_lock(target) is None
    assert holder.ask("release") == "released"
    lock = _core._try_write_lock(target)
    assert lock is not None and lock.held and lock.exclusive
    try:
        assert holder.ask("lock", target) == "busy"
        # Threads of this process are kept out too (the writer's in-process lock).
        assert _core._try_write_lock(target) is None
    finally:
        lock.release()
    assert not lock.held
    lock.release()  # a second release does nothing
    assert holder.ask("lock", target) == "held"
    assert holder.ask("release") == "released"


def test_the_lock_file_is_the_shard_of_the_temp_stem(tmp_path: Path) -> None:
    name = "\u1c89_0064x0064_anima.npz"
    assert _core._temp_stem(name) == name
    long = "\u00e9" * 150 + "_0064x0064_anima.npz"
    stem = _core._temp_stem(long)
    assert len(stem.encode()) < len(long.encode()) and "~" in stem
    p = _core._lock_path(tmp_path / name)
    assert Path(p).parent == tmp_path / ".latentcache-locks"
    assert Path(p).name.endswith(".lock") and len(Path(p).name) == len("00.lock")
    # Names that one case-insensitive file system holds as one file share a lock.
    assert _core._lock_path(tmp_path / "A.NPZ") == _core._lock_path(tmp_path / "a.npz")
    assert not (tmp_path / ".latentcache-locks").exists()  # naming it makes nothing


def test_a_held_lock_makes_the_writer_wait(tmp_path: Path) -> None:
    target = tmp_path / "w_0064x0064_anima.npz"
    z = np.zeros((16, 8, 8), np.float32)
    with _core._try_write_lock(target) as lock:  # type: ignore[union-attr]
        assert lock.held
        done = threading.Event()

        def write() -> None:
            lc.write_latents(target, latents=z, original_size=(64, 64), crop_ltrb=(0,) * 4)
            done.set()

        t = threading.Thread(target=write)
        t.start()
        assert not done.wait(0.5), "the writer must wait for the held lock"
        assert not target.exists()
    t.join(30)
    assert done.is_set() and target.exists()
    assert not lock.held


def test_a_lock_can_be_released_from_another_thread(tmp_path: Path) -> None:
    target = tmp_path / "t_0064x0064_anima.npz"
    lock = _core._try_write_lock(target)
    assert lock is not None
    t = threading.Thread(target=lock.release)
    t.start()
    t.join(30)
    again = _core._try_write_lock(target)
    assert again is not None
    del again  # dropping the object releases it
    assert _core._try_write_lock(target) is not None


def test_without_create_nothing_is_made(tmp_path: Path) -> None:
    target = tmp_path / "n_0064x0064_anima.npz"
    lock = _core._try_write_lock(target, create=False)
    assert lock is not None and not lock.exclusive
    assert not (tmp_path / ".latentcache-locks").exists()
    lock.release()
    with _core._try_write_lock(target) as held:  # type: ignore[union-attr]
        assert held.exclusive
        assert Path(_core._lock_path(target)).is_file()
