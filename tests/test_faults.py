"""Fault-injection regressions (issue 17): special files, hostile metadata, files numpy rejects,
member names numpy resolves differently, non-UTF-8 names and writes onto broken caches."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import latentcache as lc
import numpy as np
import pytest
from latentcache.errors import CachePathError, NpzFormatError
from npzgen import arrays_for, write_stock

BUCKET = (512, 512)
NAME = "a_0512x0512_anima.npz"

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="FIFOs and byte names are POSIX")


def _returns_within(fn: Callable[[], Any], fifo: Path, seconds: float = 10.0) -> Any:
    """Run ``fn`` in a thread; fail (after unblocking it by opening the FIFO's other end) if it
    has not returned within ``seconds``. Returns what it returned or raised."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        # Opening the write end releases a reader blocked in open().
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        t.join(seconds)
        pytest.fail(f"blocked on the FIFO {fifo}")
    return box


def _make_fifo(tmp_path: Path, name: str = NAME) -> Path:
    p = tmp_path / name
    os.mkfifo(p)
    return p


# --- 7: a FIFO named like a cache never hangs, and is refused with a clear error ----------------


@posix_only
@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda p: lc.load(p, BUCKET), id="load"),
        pytest.param(lambda p: lc.load(p, BUCKET, copy=True), id="load_copy"),
        pytest.param(lambda p: lc.load_batch([p], BUCKET), id="load_batch"),
        pytest.param(lambda p: lc.read_meta(p), id="read_meta"),
        pytest.param(lambda p: lc.stale_reason(p), id="stale_reason"),
    ],
)
def test_fifo_read_is_refused_not_waited_on(tmp_path: Path, call: Callable[[Path], Any]) -> None:
    fifo = _make_fifo(tmp_path)
    box = _returns_within(lambda: call(fifo), fifo)
    err = box.get("error")
    assert isinstance(err, NpzFormatError), box
    assert NAME in str(err) and "not a regular file (a FIFO)" in str(err)


@posix_only
def test_fifo_write_is_refused_and_left_alone(tmp_path: Path) -> None:
    fifo = _make_fifo(tmp_path)
    a = arrays_for(BUCKET)
    box = _returns_within(
        lambda: lc.write_latents(
            fifo, latents=a["latents_64x64"], original_size=(515, 517), crop_ltrb=(0, 0, 512, 512)
        ),
        fifo,
    )
    err = box.get("error")
    assert isinstance(err, NpzFormatError), box
    assert "not a regular file (a FIFO)" in str(err)
    assert fifo.is_fifo()
    assert lc.find_temp_files(tmp_path) == []


@posix_only
def test_fifo_validate_and_verify_answer_not_npz(tmp_path: Path) -> None:
    fifo = _make_fifo(tmp_path)
    box = _returns_within(lambda: lc.validate([fifo], BUCKET, check_source=True), fifo)
    [s] = box["value"]
    assert s.code == "not_npz"
    box = _returns_within(lambda: lc.verify_directory(tmp_path, check_source=True), fifo)
    assert [s.code for s in box["value"]] == ["not_npz"]


@posix_only
def test_fifo_source_image_does_not_hang_check_source(tmp_path: Path) -> None:
    cache = tmp_path / NAME
    a = arrays_for(BUCKET)
    image = tmp_path / "a.png"
    image.write_bytes(b"png")
    lc.write_latents(
        cache,
        latents=a["latents_64x64"],
        original_size=(512, 512),
        crop_ltrb=(0, 0, 512, 512),
        meta={"source": lc.source_fingerprint(image)},
    )
    image.unlink()
    os.mkfifo(image)
    box = _returns_within(lambda: lc.validate([cache], BUCKET, check_source=True), image)
    [s] = box["value"]
    # A FIFO is not taken for the image (no image: cannot be stale); never a hang.
    assert s.code == "ok", s.message
    box = _returns_within(lambda: lc.source_fingerprint(image), image)
    assert isinstance(box.get("error"), NpzFormatError), box


# --- 2: hostile metadata is a status or an NpzFormatError, never a RecursionError ---------------


def _cache_with_meta(tmp_path: Path, raw: bytes) -> Path:
    arrays = dict(arrays_for(BUCKET))
    arrays["latentcache_meta"] = np.frombuffer(raw, dtype=np.uint8)
    return write_stock(tmp_path / NAME, arrays)


DEEP = [b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 3000 + b"1" + b"}" * 3000, b"[" * 40 + b"]" * 40]


@pytest.mark.parametrize("raw", DEEP, ids=["arrays_100k", "objects_3k", "arrays_40"])
def test_deeply_nested_meta_is_a_status_not_a_recursion_error(tmp_path: Path, raw: bytes) -> None:
    cache = _cache_with_meta(tmp_path, raw)
    (tmp_path / "a.png").write_bytes(b"png")
    [s] = lc.validate([cache], BUCKET, check_source=True)
    assert s.code == "malformed" and "latentcache_meta" in s.message and NAME in s.message
    [v] = lc.verify_directory(tmp_path, check_source=True)
    assert v.code == "malformed"
    [s] = lc.validate([cache], BUCKET, vae="v1")
    assert s.code == "malformed"
    with pytest.raises(NpzFormatError, match="nested deeper"):
        lc.read_meta(cache)
    with pytest.raises(NpzFormatError, match="nested deeper"):
        lc.stale_reason(cache)
    # Without the metadata checks the file is fine: its arrays are intact.
    assert lc.validate([cache], BUCKET)[0].ok


def test_brackets_inside_meta_strings_do_not_count(tmp_path: Path) -> None:
    cache = _cache_with_meta(tmp_path, b'{"note": "' + b"[{" * 200 + b'"}')
    assert lc.read_meta(cache) == {"note": "[{" * 200}


def test_write_refuses_meta_it_could_not_read_back(tmp_path: Path) -> None:
    a = arrays_for(BUCKET)
    deep: Any = 1
    for _ in range(40):
        deep = [deep]
    with pytest.raises(ValueError, match="nested deeper than 32"):
        lc.write_latents(
            tmp_path / NAME,
            latents=a["latents_64x64"],
            original_size=(512, 512),
            crop_ltrb=(0, 0, 512, 512),
            meta={"deep": deep},
        )
    assert not (tmp_path / NAME).exists()


# --- 1: a write leaves a file whose new resolution validates and loads ---------------------------


def _zip_with_extra(path: Path, name: str, payload: bytes, base: dict[str, np.ndarray]) -> Path:
    """A stock np.savez file of ``base`` plus one raw member ``name`` holding ``payload``."""
    import zipfile

    write_stock(path, base)
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr(name, payload)
    return path


def _npy_bytes(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, allow_pickle=False)
    return buf.getvalue()


BAD_MEMBERS = {
    "trailing_bytes": ("extra.npy", _npy_bytes(np.arange(3, dtype=np.int64)) + b"xyz"),
    "not_npy": ("extra.npy", b"this is not an npy file at all"),
    "short": ("extra.npy", _npy_bytes(np.arange(8, dtype=np.int64))[:-5]),
}


@pytest.mark.parametrize("case", sorted(BAD_MEMBERS))
def test_write_drops_a_kept_member_that_would_break_the_file(tmp_path: Path, case: str) -> None:
    name, payload = BAD_MEMBERS[case]
    path = _zip_with_extra(tmp_path / NAME, name, payload, arrays_for((1024, 1024)))
    assert lc.validate([path], (1024, 1024))[0].code == "malformed"
    new = arrays_for(BUCKET, seed=3)
    with pytest.warns(lc.CorruptCacheWarning, match=r"dropping member 'extra\.npy'"):
        lc.write_latents(
            path,
            latents=new["latents_64x64"],
            original_size=(515, 517),
            crop_ltrb=(1.5, 0, 510.75, 512),
        )
    for bucket in (BUCKET, (1024, 1024)):
        assert lc.validate([path], bucket)[0].ok, lc.validate([path], bucket)[0].message
    got = lc.load(path, BUCKET)
    np.testing.assert_array_equal(got.latents, new["latents_64x64"])
    with np.load(path) as z:
        assert "extra" not in z.files
        np.testing.assert_array_equal(z["latents_64x64"], new["latents_64x64"])
        np.testing.assert_array_equal(z["latents_128x128"], arrays_for((1024, 1024))["latents_128x128"])


def test_write_replaces_a_member_named_exactly_as_its_key(tmp_path: Path) -> None:
    # numpy resolves a key to the member of exactly that name first: a kept `latents_64x64` member
    # would shadow the written `latents_64x64.npy` for np.load.
    path = _zip_with_extra(
        tmp_path / NAME, "latents_64x64", _npy_bytes(np.zeros((16, 64, 64), np.float32)), {}
    )
    new = arrays_for(BUCKET, seed=4)
    lc.write_latents(path, latents=new["latents_64x64"], original_size=(512, 512), crop_ltrb=(0, 0, 512, 512))
    with np.load(path) as z:
        assert sorted(z.files).count("latents_64x64") == 1
        np.testing.assert_array_equal(z["latents_64x64"], new["latents_64x64"])
    np.testing.assert_array_equal(lc.load(path, BUCKET).latents, new["latents_64x64"])


# --- 3 and 4: what numpy refuses or reads differently, latentcache refuses too -------------------


def _stock_bytes(tmp_path: Path) -> bytes:
    return write_stock(tmp_path / "src.npz", arrays_for(BUCKET)).read_bytes()


def _eocd(data: bytes) -> int:
    return data.rindex(b"PK\x05\x06")


def _cd_entries(data: bytes) -> list[int]:
    out, at = [], 0
    while (at := data.find(b"PK\x01\x02", at)) >= 0:
        out.append(at)
        at += 4
    return out


def _second_eocd(data: bytes) -> bytes:
    e = _eocd(data)
    return data + data[e : e + 22]


def _version_needed(data: bytes) -> bytes:
    b = bytearray(data)
    b[_cd_entries(data)[0] + 6] = 64
    return bytes(b)


def _flag_bit5(data: bytes) -> bytes:
    b = bytearray(data)
    b[_cd_entries(data)[1] + 8] |= 0x20
    return bytes(b)


def _gap_before_eocd(data: bytes) -> bytes:
    e = _eocd(data)
    return data[:e] + b"\0" * 7 + data[e:]


def _zip64(tmp_path: Path, record_before_locator: bool) -> bytes:
    import struct

    data = _stock_bytes(tmp_path)
    e = _eocd(data)
    n = len(_cd_entries(data))
    cd_size, cd_off = struct.unpack_from("<II", data, e + 12)
    rec = struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, n, n, cd_size, cd_off)
    loc = struct.pack("<4sIQI", b"PK\x06\x07", 0, e, 1)
    # The record where its locator says, but 8 bytes before the locator: zipfile looks directly
    # before the locator only.
    pad = b"" if record_before_locator else b"\0" * 8
    return data[:e] + rec + pad + loc + data[e:]


def _zip64_record_gap(tmp_path: Path) -> bytes:
    import struct

    data = _stock_bytes(tmp_path)
    e = _eocd(data)
    n = len(_cd_entries(data))
    cd_size, cd_off = struct.unpack_from("<II", data, e + 12)
    rec = struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, n, n, cd_size, cd_off)
    pad = b"\0" * 8
    loc = struct.pack("<4sIQI", b"PK\x06\x07", 0, e + len(pad), 1)
    # A gap between the central directory and the ZIP64 record is what is tested; the record
    # itself sits directly before the locator, as zipfile requires, in the control below.
    return data[:e] + pad + rec + loc + data[e:]


def _npy_header(arr: np.ndarray, dict_text: bytes) -> bytes:
    hlen = len(dict_text)
    return b"\x93NUMPY\x01\x00" + hlen.to_bytes(2, "little") + dict_text + arr.tobytes()


def _with_member(tmp_path: Path, name: str, payload: bytes) -> bytes:
    return _zip_with_extra(tmp_path / "m.npz", name, payload, arrays_for(BUCKET)).read_bytes()


def _long_header(tmp_path: Path) -> bytes:
    arr = np.arange(3, dtype=np.int64)
    text = b"{'descr': '<i8', 'fortran_order': False, 'shape': (3,), }" + b" " * 10_001 + b"\n"
    return _with_member(tmp_path, "extra.npy", _npy_header(arr, text))


def _bad_dict(tmp_path: Path) -> bytes:
    # numpy's literal_eval gives an int, not a tuple, for `(3)`.
    arr = np.arange(3, dtype=np.int64)
    return _with_member(
        tmp_path, "extra.npy", _npy_header(arr, b"{'descr': '<i8', 'fortran_order': False, 'shape': (3)}\n")
    )


def _bare_and_npy(tmp_path: Path) -> bytes:
    return _with_member(
        tmp_path,
        "latents_64x64",
        _npy_header(
            np.zeros((16, 64, 64), np.float32),
            b"{'descr': '<f4', 'fortran_order': False, 'shape': (16, 64, 64), }\n",
        ),
    )


NUMPY_REJECTS: dict[str, Callable[[Path], bytes]] = {
    "second_eocd": lambda t: _second_eocd(_stock_bytes(t)),
    "version_needed_64": lambda t: _version_needed(_stock_bytes(t)),
    "flag_bit_5": lambda t: _flag_bit5(_stock_bytes(t)),
    "gap_before_eocd": lambda t: _gap_before_eocd(_stock_bytes(t)),
    "zip64_gap": _zip64_record_gap,
    "zip64_record_not_before_locator": lambda t: _zip64(t, False),
    "npy_header_over_10000": _long_header,
    "shape_not_a_tuple": _bad_dict,
}


def _numpy_reads(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    except Exception:  # noqa: BLE001 - any refusal counts
        return None


@pytest.mark.parametrize("case", sorted(NUMPY_REJECTS))
def test_what_numpy_rejects_is_not_ok(tmp_path: Path, case: str) -> None:
    path = tmp_path / NAME
    path.write_bytes(NUMPY_REJECTS[case](tmp_path))
    assert _numpy_reads(path) is None, "the mutation must be one numpy refuses"
    [s] = lc.validate([path], BUCKET)
    assert s.code == "malformed", s.message
    assert NAME in s.message
    with pytest.raises(NpzFormatError):
        lc.load(path, BUCKET)
    [v] = lc.verify_directory(tmp_path)
    assert v.code == "malformed"


def test_a_key_and_key_npy_pair_is_refused_not_read_differently(tmp_path: Path) -> None:
    path = tmp_path / NAME
    path.write_bytes(_bare_and_npy(tmp_path))
    with np.load(path) as z:  # numpy reads the bare member: zeros, not the stored latents
        assert not np.any(z["latents_64x64"])
    [s] = lc.validate([path], BUCKET)
    assert s.code == "malformed" and "'latents_64x64' and 'latents_64x64.npy'" in s.message
    with pytest.raises(NpzFormatError, match="latents_64x64"):
        lc.load(path, BUCKET)
    with pytest.raises(NpzFormatError):
        lc.load_batch([path], BUCKET)


def test_a_well_formed_zip64_end_is_still_ok(tmp_path: Path) -> None:
    path = tmp_path / NAME
    path.write_bytes(_zip64(tmp_path, True))
    assert _numpy_reads(path) is not None
    assert lc.validate([path], BUCKET)[0].ok
    np.testing.assert_array_equal(lc.load(path, BUCKET).latents, arrays_for(BUCKET)["latents_64x64"])


# --- 5 and 6: names that are not UTF-8 keep their bytes ------------------------------------------


def _byte_name(directory: Path, raw: bytes) -> str:
    """The path of ``directory/raw`` as ``os.fsdecode`` gives it (surrogate escapes)."""
    return os.path.join(os.fspath(directory), os.fsdecode(raw))


def _skip_unless_byte_names(tmp_path: Path) -> None:
    try:
        Path(_byte_name(tmp_path, b"\xff.probe")).write_bytes(b"")
    except (OSError, UnicodeError):
        pytest.skip("the file system refuses names that are not UTF-8")
    os.unlink(_byte_name(tmp_path, b"\xff.probe"))


@posix_only
def test_scan_pairs_non_utf8_names_by_their_bytes(tmp_path: Path) -> None:
    _skip_unless_byte_names(tmp_path)
    a = arrays_for(BUCKET)
    for raw in (b"\xff.png", b"\xfe.png"):
        Path(_byte_name(tmp_path, raw)).write_bytes(b"png")
    cache_ff = _byte_name(tmp_path, b"\xff_0512x0512_anima.npz")
    write_stock(Path(cache_ff), a)
    orphan = _byte_name(tmp_path, b"\xfd_0512x0512_anima.npz")
    write_stock(Path(orphan), a)
    report = lc.scan_directory(tmp_path)
    by_image = {i.path: [c.path for c in i.caches] for i in report.images}
    assert by_image == {
        _byte_name(tmp_path, b"\xfe.png"): [],
        _byte_name(tmp_path, b"\xff.png"): [cache_ff],
    }
    assert [c.path for c in report.orphan_caches] == [orphan]
    for p in [*by_image, cache_ff, orphan]:
        assert os.path.exists(p), p
    statuses = lc.verify_directory(tmp_path)
    assert sorted((s.path, s.code) for s in statuses) == sorted([(cache_ff, "ok"), (orphan, "ok")])
    [s] = lc.validate([cache_ff], BUCKET)
    assert s.ok and s.path == cache_ff
    [s] = lc.validate([Path(cache_ff)], BUCKET)
    assert s.ok and s.path == cache_ff
    # Name arithmetic works on text: such a name is refused by name, never mangled.
    with pytest.raises(CachePathError, match="not valid UTF-8"):
        lc.parse_cache_path(cache_ff)


@posix_only
def test_temp_files_of_a_non_utf8_target_are_listed_and_removed(tmp_path: Path) -> None:
    _skip_unless_byte_names(tmp_path)
    locked = _byte_name(tmp_path, b".\xff_0512x0512_anima.npz.lctmp")
    unlocked = _byte_name(tmp_path, b".\xff_0512x0512_anima.npz.lctmp-123-abc")
    for p in (locked, unlocked):
        Path(p).write_bytes(b"half")
    assert lc.find_temp_files(tmp_path) == sorted([locked, unlocked], key=os.fsencode)
    assert sorted(lc.scan_directory(tmp_path).temp_files) == sorted([locked, unlocked])
    assert lc.remove_stale_temp(locked) is True
    assert not os.path.exists(locked)
    assert lc.remove_stale_temp(unlocked) is False  # a lockless writer's may be live


def test_write_onto_a_key_pair_keeps_other_resolutions_and_drops_the_bare_member(tmp_path: Path) -> None:
    other = arrays_for((1024, 1024))
    arrays = {**other, "extra": np.arange(3)}
    path = _zip_with_extra(tmp_path / NAME, "extra", b"raw bytes", arrays)
    [s] = lc.validate([path], (1024, 1024))
    assert s.code == "malformed" and "'extra' and 'extra.npy'" in s.message
    new = arrays_for(BUCKET, seed=5)
    with pytest.warns(lc.CorruptCacheWarning, match=r"dropping member 'extra'"):
        lc.write_latents(
            path, latents=new["latents_64x64"], original_size=(512, 512), crop_ltrb=(0, 0, 512, 512)
        )
    for bucket in (BUCKET, (1024, 1024)):
        assert lc.validate([path], bucket)[0].ok
    with np.load(path) as z:
        np.testing.assert_array_equal(z["extra"], np.arange(3))
        np.testing.assert_array_equal(z["latents_128x128"], other["latents_128x128"])
