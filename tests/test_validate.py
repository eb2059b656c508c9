"""latentcache.validate against a corpus of broken caches built with numpy, plus property tests."""

from __future__ import annotations

import gc
import os
import random
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import latentcache as lc
import numpy as np
import pytest
from gilprobe import run_with_probe
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from npzgen import arrays_for, write_aligned, write_stock

BUCKET = (64, 32)  # (W, H) -> h, w = 4, 8
SFX = "_4x8"
LAT = "latents" + SFX
FLIP = "latents_flipped" + SFX
ALPHA = "alpha_mask" + SFX
OSIZE = "original_size" + SFX
CROP = "crop_ltrb" + SFX
CODES = set(lc.status_codes())
LFS_POINTER = (
    b"version https://git-lfs.github.com/spec/v1\n"
    b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
    b"size 1048797\n"
)


def check_status(s: lc.CacheStatus, path: Path | str, code: str, entry: str | None = None) -> None:
    """The exact code, the invariants every status keeps, and a message naming the file and entry."""
    assert s.code == code, s.message
    assert s.path == str(path)
    assert s.ok is (code == "ok") and bool(s) is s.ok
    if code == "ok":
        assert s.message == ""
        return
    assert s.message.startswith(f"{path}: "), s.message
    if entry is not None:
        assert f"entry '{entry}'" in s.message, s.message


def one(path: Path | str, bucket: tuple[int, int] = BUCKET, **kw: Any) -> lc.CacheStatus:
    (s,) = lc.validate([path], bucket, **kw)
    return s


def with_(base: dict[str, np.ndarray], **changes: np.ndarray | None) -> dict[str, np.ndarray]:
    """A copy of `base` with keys replaced, added or (value None) removed."""
    out = dict(base)
    for k, v in changes.items():
        if v is None:
            out.pop(k)
        else:
            out[k] = v
    return out


def flip_payload_byte(path: Path, key: str, at_from_end: int = 9) -> None:
    """Flip one byte of a stored member's array data; the zip and npy structure stay valid."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(key + ".npy")
        assert info.compress_type == zipfile.ZIP_STORED
    data = bytearray(path.read_bytes())
    local = info.header_offset
    name_len = int.from_bytes(data[local + 26 : local + 28], "little")
    extra_len = int.from_bytes(data[local + 28 : local + 30], "little")
    start = local + 30 + name_len + extra_len
    data[start + info.compress_size - at_from_end] ^= 0x40
    path.write_bytes(bytes(data))


# --- the corpus: every broken file with the exact status it must give ---------------------------


@dataclass
class Case:
    name: str
    write: Callable[[Path], object] | None  # None: the path is not created
    code: str
    entry: str | None = None
    kw: dict[str, Any] = field(default_factory=dict)
    contains: str = ""


def _corpus() -> list[Case]:
    base = arrays_for(BUCKET, seed=1)
    full = arrays_for(BUCKET, flip=True, alpha=True, seed=2)
    z = np.zeros
    lat = base[LAT]
    nan = lat.copy()
    nan[3, 1, 2] = np.nan
    inf = full[FLIP].copy()
    inf[0, 0, 5] = -np.inf
    all_opt = {"flipped": True, "alpha_mask": True}
    crc = {"verify_crc": True}

    def stock(arrs: dict[str, np.ndarray], compressed: bool = False) -> Callable[[Path], object]:
        return lambda p: write_stock(p, arrs, compressed)

    def flipped(arrs: dict[str, np.ndarray], key: str) -> Callable[[Path], object]:
        return lambda p: (write_stock(p, arrs), flip_payload_byte(p, key))

    def raw(b: bytes) -> Callable[[Path], object]:
        return lambda p: p.write_bytes(b)

    def plain_zip(p: Path) -> None:
        with zipfile.ZipFile(p, "w") as zf:
            zf.writestr("readme.txt", "not arrays")

    return [
        # Valid caches.
        Case("stock", stock(base), "ok"),
        Case("stock_all_checks", stock(base), "ok", kw={"verify_crc": True, "check_finite": True}),
        Case("flip_alpha", stock(full), "ok", kw={**all_opt, "verify_crc": True, "check_finite": True}),
        Case("extra_keys_ignored", stock(full), "ok"),
        Case("compressed", stock(full, True), "ok", kw={**all_opt, "verify_crc": True, "check_finite": True}),
        Case(
            "legacy_16x1xhxw", stock(arrays_for(BUCKET, flip=True, legacy=True)), "ok", kw={"flipped": True}
        ),
        Case("aligned_zipfile", lambda p: write_aligned(p, full), "ok", kw={**all_opt, **crc}),
        Case(
            "int32_size_int_crop", stock(with_(base, **{OSIZE: z(2, np.int32), CROP: z(4, np.int64)})), "ok"
        ),
        Case("nan_unchecked", stock(with_(base, **{LAT: nan})), "ok"),
        Case("payload_flip_unchecked", flipped(full, LAT), "ok", kw=all_opt),
        # File level.
        Case("missing_file", None, "missing", contains="does not exist"),
        Case("directory", lambda p: p.mkdir(), "not_npz", contains="directory"),
        Case("empty", raw(b""), "empty"),
        Case("random_bytes", raw(np.random.default_rng(5).bytes(4096)), "not_npz"),
        Case("lfs_pointer", raw(LFS_POINTER), "not_npz", contains="git-lfs"),
        Case("text", raw(b"hello\n"), "not_npz"),
        Case(
            "truncated_half", lambda p: p.write_bytes(write_stock(p, base).read_bytes()[:2000]), "truncated"
        ),
        # Keys.
        Case("other_bucket", stock(arrays_for((128, 128))), "missing_key", LAT, contains="latents_16x16"),
        Case("no_original_size", stock(with_(base, **{OSIZE: None})), "missing_key", OSIZE),
        Case("no_crop_ltrb", stock(with_(base, **{CROP: None})), "missing_key", CROP),
        Case("no_flipped", stock(base), "missing_key", FLIP, kw={"flipped": True}),
        Case("no_alpha", stock(with_(full, **{ALPHA: None})), "missing_key", ALPHA, kw=all_opt),
        Case("zip_without_arrays", plain_zip, "missing_key", LAT, contains="found entries: none"),
        # Dtypes, shapes, layout.
        Case("four_channels", stock(with_(base, **{LAT: z((4, 4, 8), np.float32)})), "bad_shape", LAT),
        Case("transposed", stock(with_(base, **{LAT: z((16, 8, 4), np.float32)})), "bad_shape", LAT),
        Case(
            "float16",
            stock(with_(base, **{LAT: lat.astype(np.float16)})),
            "bad_dtype",
            LAT,
            contains="float16",
        ),
        Case("float64", stock(with_(base, **{LAT: lat.astype(np.float64)})), "bad_dtype", LAT),
        Case("big_endian", stock(with_(base, **{LAT: lat.astype(">f4")})), "bad_dtype", LAT),
        Case("string_latents", stock(with_(base, **{LAT: np.array(["ab"] * 3)})), "bad_dtype", LAT),
        Case(
            "fortran",
            stock(with_(base, **{LAT: np.asfortranarray(lat)})),
            "bad_shape",
            LAT,
            contains="Fortran order",
        ),
        Case(
            "fortran_flipped",
            stock(with_(full, **{FLIP: np.asfortranarray(full[FLIP])})),
            "bad_shape",
            FLIP,
            kw=all_opt,
        ),
        Case(
            "flipped_wrong_shape",
            stock(with_(full, **{FLIP: z((16, 4, 9), np.float32)})),
            "bad_shape",
            FLIP,
            kw=all_opt,
        ),
        Case(
            "alpha_transposed",
            stock(with_(full, **{ALPHA: z((64, 32), np.float32)})),
            "bad_shape",
            ALPHA,
            kw=all_opt,
        ),
        Case(
            "alpha_uint8",
            stock(with_(full, **{ALPHA: z((32, 64), np.uint8)})),
            "bad_dtype",
            ALPHA,
            kw=all_opt,
        ),
        Case("size_float", stock(with_(base, **{OSIZE: z(2, np.float64)})), "bad_dtype", OSIZE),
        Case("size_three", stock(with_(base, **{OSIZE: z(3, np.int64)})), "bad_shape", OSIZE),
        Case("crop_complex", stock(with_(base, **{CROP: z(4, np.complex64)})), "bad_dtype", CROP),
        Case("crop_2x2", stock(with_(base, **{CROP: z((2, 2))})), "bad_shape", CROP),
        # Opt-in payload checks.
        Case("payload_flip_crc", flipped(full, LAT), "crc_mismatch", LAT, kw={**all_opt, **crc}),
        Case("size_flip_crc", flipped(base, OSIZE), "crc_mismatch", OSIZE, kw=crc),
        Case("nan", stock(with_(base, **{LAT: nan})), "non_finite", LAT, kw={"check_finite": True}),
        Case(
            "inf_flipped",
            stock(with_(full, **{FLIP: inf})),
            "non_finite",
            FLIP,
            kw={**all_opt, "check_finite": True, "verify_crc": True},
            contains=f"first at flat index {5}",
        ),
        Case(
            "nan_compressed",
            stock(with_(base, **{LAT: nan}), True),
            "non_finite",
            LAT,
            kw={"check_finite": True},
        ),
    ]


CORPUS = _corpus()


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    for c in CORPUS:
        if c.write is not None:
            c.write(d / f"{c.name}_0064x0032_anima.npz")
    return d


@pytest.mark.parametrize("case", CORPUS, ids=[c.name for c in CORPUS])
def test_corpus(corpus_dir: Path, case: Case) -> None:
    p = corpus_dir / f"{case.name}_0064x0032_anima.npz"
    s = one(str(p), **case.kw)
    check_status(s, p, case.code, case.entry)
    assert case.contains in s.message


def test_corpus_in_one_call_matches_single_calls(corpus_dir: Path) -> None:
    """Per-path flipped/alpha_mask lists in one parallel call give the same statuses as single calls."""
    paths = [corpus_dir / f"{c.name}_0064x0032_anima.npz" for c in CORPUS]
    flips = [bool(c.kw.get("flipped")) for c in CORPUS]
    alphas = [bool(c.kw.get("alpha_mask")) for c in CORPUS]
    for crc, finite in [(False, False), (True, True)]:
        got = lc.validate(
            paths, BUCKET, flipped=flips, alpha_mask=alphas, verify_crc=crc, check_finite=finite
        )
        for i, (c, p, s) in enumerate(zip(CORPUS, paths, got, strict=True)):
            single = one(p, flipped=flips[i], alpha_mask=alphas[i], verify_crc=crc, check_finite=finite)
            assert (s.path, s.code, s.message) == (single.path, single.code, single.message)
            if c.kw.get("verify_crc", False) == crc and c.kw.get("check_finite", False) == finite:
                check_status(s, p, c.code, c.entry)


@pytest.mark.parametrize("compressed", [False, True])
def test_truncated_at_every_point(tmp_path: Path, compressed: bool) -> None:
    src = write_stock(tmp_path / "src.npz", arrays_for((16, 16), flip=True, seed=3), compressed)
    data = src.read_bytes()
    paths = []
    for cut in range(1, len(data)):
        p = tmp_path / f"cut{cut}.npz"
        p.write_bytes(data[:cut])
        paths.append(p)
    for p, s in zip(paths, lc.validate(paths, (16, 16), flipped=True), strict=True):
        check_status(s, p, "truncated")


def test_truncated_big_file_sampled(tmp_path: Path) -> None:
    """A 1 MiB sd-scripts cache cut inside every region: local headers, payloads, central directory."""
    src = write_stock(tmp_path / "src.npz", arrays_for((1024, 1024), flip=True, seed=4))
    data = src.read_bytes()
    n = len(data)
    cuts = sorted({*range(1, 300, 7), *range(n // 2 - 50, n // 2 + 50, 3), *range(n - 400, n)})
    # In parallel batches of 64 files, each deleted after its check: all 500+ at once would be 900 MB.
    for start in range(0, len(cuts), 64):
        paths = []
        for cut in cuts[start : start + 64]:
            p = tmp_path / f"cut{cut}.npz"
            p.write_bytes(data[:cut])
            paths.append(p)
        statuses = lc.validate(paths, (1024, 1024), flipped=True, verify_crc=True)
        for p, s in zip(paths, statuses, strict=True):
            check_status(s, p, "truncated")
            p.unlink()


def test_flipped_and_alpha_mask_per_path(tmp_path: Path) -> None:
    plain = write_stock(tmp_path / "plain.npz", arrays_for(BUCKET))
    flip = write_stock(tmp_path / "flip.npz", arrays_for(BUCKET, flip=True))
    alpha = write_stock(tmp_path / "alpha.npz", arrays_for(BUCKET, alpha=True))
    big = write_stock(tmp_path / "big.npz", arrays_for((128, 256), flip=True, alpha=True))
    paths = [plain, flip, alpha, big]
    assert [s.code for s in lc.validate(paths, BUCKET)] == ["ok", "ok", "ok", "missing_key"]
    resos = [BUCKET, BUCKET, BUCKET, (128, 256)]
    assert all(lc.validate(paths, resos))
    got = lc.validate(paths, resos, flipped=True)
    assert [s.code for s in got] == ["missing_key", "ok", "missing_key", "ok"]
    check_status(got[0], plain, "missing_key", FLIP)
    got = lc.validate(paths, resos, alpha_mask=True)
    assert [s.code for s in got] == ["missing_key", "missing_key", "ok", "ok"]
    check_status(got[3], big, "ok")
    got = lc.validate(paths, resos, flipped=[False, True, False, True], alpha_mask=[False, False, True, True])
    assert all(s.ok for s in got), [s.message for s in got]
    got = lc.validate(
        paths, resos, flipped=(True, False, False, False), alpha_mask=[True, False, False, False]
    )
    check_status(got[0], plain, "missing_key", FLIP)  # flipped latents are checked before the mask
    # Path-like objects and str both work; the status carries str(path).
    assert lc.validate([str(plain), plain], BUCKET)[1].path == str(plain)


def test_bad_arguments(tmp_path: Path) -> None:
    p = write_stock(tmp_path / "a.npz", arrays_for(BUCKET))
    assert lc.validate([], BUCKET) == []
    with pytest.raises(ValueError, match="buckets"):
        lc.validate([p, p], [BUCKET, BUCKET, BUCKET])
    with pytest.raises(ValueError, match="flipped"):
        lc.validate([p], BUCKET, flipped=[True, False])
    with pytest.raises(ValueError, match="alpha_mask"):
        lc.validate([p, p, p], BUCKET, alpha_mask=[True, False])
    with pytest.raises(ValueError, match="workers"):
        lc.validate([p], BUCKET, workers=0)
    with pytest.raises((OverflowError, TypeError, ValueError)):
        lc.validate([p], BUCKET, workers=-1)


def test_the_binding_names_its_arguments_as_validate_does(tmp_path: Path) -> None:
    """The binding's own argument errors say ``buckets`` and ``flipped`` (no rewriting in Python);
    neither ``validate`` nor ``_validate_with_meta`` takes the old name ``flip_aug``."""
    p = write_stock(tmp_path / "a.npz", arrays_for(BUCKET))
    with pytest.raises(ValueError, match=r"^buckets has 3 entries for 2 paths"):
        lc._core.validate([p, p], [BUCKET, BUCKET, BUCKET])
    with pytest.raises(ValueError, match=r"^buckets: \(0, 0\) is not a bucket"):
        lc._core.validate([p], (0, 0))
    with pytest.raises(ValueError, match=r"^flipped has 2 entries for 1 paths?"):
        lc._core.validate([p], BUCKET, flipped=[True, False])
    with pytest.raises(ValueError, match=r"^flipped has 2 entries for 1 paths?"):
        lc._core._validate_with_meta([p], BUCKET, flipped=[True, False])
    with pytest.raises(TypeError, match="flip_aug"):
        lc._core.validate([p], BUCKET, flip_aug=True)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="flip_aug"):
        lc._core._validate_with_meta([p], BUCKET, flip_aug=True)  # type: ignore[call-arg]
    flipped = lc._core._validate_with_meta([p], BUCKET, flipped=True)
    assert [s.code for s, _ in flipped] == ["missing_key"]
    assert [s.code for s in lc._core.validate([p], BUCKET, flipped=False)] == ["ok"]


def test_a_bucket_smaller_than_one_latent_is_refused(tmp_path: Path) -> None:
    p = write_stock(tmp_path / "a.npz", arrays_for(BUCKET))
    for bad in [(0, 0), (64, 4)]:
        with pytest.raises(ValueError, match=rf"buckets: \({bad[0]}, {bad[1]}\) is not a bucket"):
            lc.validate([p], bad)
    with pytest.raises(ValueError, match="is not a bucket"):
        lc.validate([p, p], [BUCKET, (0, 8)])


def test_status_codes_are_the_documented_set() -> None:
    assert lc.status_codes() == [
        "ok",
        "missing",
        "empty",
        "not_npz",
        "truncated",
        "missing_key",
        "bad_shape",
        "bad_dtype",
        "malformed",
        "crc_mismatch",
        "non_finite",
        "io_error",
        "wrong_model",
        "stale",
    ]


def test_status_code_enum_and_the_core_list_agree_exactly() -> None:
    from latentcache import _core

    assert [c.value for c in lc.StatusCode] == [*_core.status_codes(), "stale"]
    assert lc.status_codes() == list(lc.StatusCode)
    assert all(isinstance(c, lc.StatusCode) for c in lc.status_codes())


def test_status_codes_compare_print_and_serialise_as_their_strings(tmp_path: Path) -> None:
    import json

    p = write_stock(tmp_path / "a.npz", arrays_for(BUCKET))
    ok, missing = lc.validate([p, tmp_path / "nope.npz"], BUCKET)
    assert ok.code == lc.StatusCode.OK and lc.StatusCode.OK == ok.code
    assert missing.code == lc.StatusCode.MISSING and missing.code != lc.StatusCode.OK
    assert type(ok.code) is str  # CacheStatus.code stays a plain str
    assert lc.StatusCode(missing.code) is lc.StatusCode.MISSING
    assert str(lc.StatusCode.NOT_NPZ) == "not_npz" and f"{lc.StatusCode.NOT_NPZ}" == "not_npz"
    assert json.dumps({"code": lc.StatusCode.CRC_MISMATCH}) == '{"code": "crc_mismatch"}'
    assert {lc.StatusCode.OK: 1}["ok"] == 1  # hashes as its string


def test_deprecated_spellings_of_validate(tmp_path: Path) -> None:
    import warnings

    p = write_aligned(tmp_path / "a.npz", arrays_for(BUCKET, flip=True))
    want = [s.code for s in lc.validate([p, p], [BUCKET, BUCKET], flipped=[True, False])]
    with pytest.warns(DeprecationWarning, match=r"bucket_resos= is deprecated.*buckets="):
        got = lc.validate([p, p], bucket_resos=[BUCKET, BUCKET], flipped=[True, False])
    assert [s.code for s in got] == want
    with pytest.warns(DeprecationWarning, match=r"flip_aug= is deprecated.*flipped=") as rec:
        got = lc.validate([p, p], BUCKET, flip_aug=[True, False])
    assert rec[0].filename == __file__
    assert [s.code for s in got] == want
    with pytest.raises(TypeError, match="both flipped= and"):
        lc.validate([p], BUCKET, flipped=True, flip_aug=True)
    with pytest.raises(TypeError, match="'buckets'"):
        lc.validate([p])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lc.validate([p], BUCKET, flipped=True)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_is_io_error(tmp_path: Path) -> None:
    p = write_stock(tmp_path / "a.npz", arrays_for(BUCKET))
    p.chmod(0)
    try:
        check_status(one(p), p, "io_error")
    finally:
        p.chmod(0o644)


@pytest.mark.parametrize("workers", [None, 1, 3, 32])
def test_results_in_input_order(corpus_dir: Path, workers: int | None) -> None:
    cases = [c for c in CORPUS if not c.kw] * 6
    random.Random(workers or 0).shuffle(cases)
    paths = [str(corpus_dir / f"{c.name}_0064x0032_anima.npz") for c in cases]
    got = lc.validate(paths, BUCKET, workers=workers)
    assert [s.path for s in got] == paths
    assert [s.code for s in got] == [c.code for c in cases]
    # Statuses hold only strings: the cycle collector does not track them, and a collection
    # leaves every one intact.
    assert not any(gc.is_tracked(s) for s in got)
    gc.collect()
    assert [s.path for s in got] == paths and all(isinstance(s.message, str) for s in got)


def test_interpreter_lock_released(tmp_path: Path) -> None:
    """Another Python thread keeps running, without gaps, through one long validate call."""
    p = write_stock(tmp_path / "big.npz", arrays_for((512, 512), flip=True, seed=6))  # ~0.5 MiB
    state = {"n": 500}
    results: list[list[lc.CacheStatus]] = []

    def call() -> None:
        results.append(
            lc.validate(
                [p] * state["n"], (512, 512), flipped=True, verify_crc=True, check_finite=True, workers=1
            )
        )

    def grow() -> None:
        state["n"] *= 2

    run_with_probe(call, 0.4, grow)
    assert all(s.ok for s in results[-1])


# --- property tests --------------------------------------------------------------------------------

NAME_CHARS = st.sampled_from("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789_-.éß漢")
DTYPES = ["<f4", ">f4", "<f2", "<f8", ">f8", "<i4", "<i8", "|u1", "|i1", "<u2", "|b1", "<c8", "<c16"]


def _dtype_name(d: np.dtype) -> str:
    return d.name + (" (big-endian)" if d.byteorder == ">" else "")


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(
    w=st.integers(1, 48),
    h=st.integers(1, 48),
    flip=st.booleans(),
    alpha=st.booleans(),
    legacy=st.booleans(),
    compressed=st.booleans(),
    aligned=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_valid_caches_are_ok_for_any_bucket(
    w: int, h: int, flip: bool, alpha: bool, legacy: bool, compressed: bool, aligned: bool, seed: int
) -> None:
    bucket = (w * 8, h * 8)
    arrs = arrays_for(bucket, flip=flip, alpha=alpha, seed=seed, legacy=legacy)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "c.npz"
        write_aligned(p, arrs) if aligned and not compressed else write_stock(p, arrs, compressed)
        s = one(p, bucket, flipped=flip, alpha_mask=alpha, verify_crc=True, check_finite=True)
        check_status(s, p, "ok")
        if (w, h) != (h, w):  # the transposed bucket asks for other keys
            check_status(one(p, (h * 8, w * 8)), p, "missing_key", f"latents_{w}x{h}")


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(
    dtype=st.sampled_from(DTYPES),
    shape=st.one_of(
        st.just((16, 3, 2)),
        st.just((16, 1, 3, 2)),
        st.lists(st.sampled_from([1, 2, 3, 4, 16]), min_size=0, max_size=5).map(tuple),
    ),
    fortran=st.booleans(),
    flip_key=st.booleans(),
)
def test_latent_dtype_and_shape_round_trip(
    dtype: str, shape: tuple[int, ...], fortran: bool, flip_key: bool
) -> None:
    """ok iff float32 in native order, (16, h, w) or (16, 1, h, w), C order; otherwise the message
    reports the dtype and shape exactly as np.savez wrote them."""
    bucket = (16, 24)  # h, w = 3, 2
    arr = np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape).astype(dtype)
    if fortran and arr.ndim:
        arr = np.asfortranarray(arr)
    key = "latents_flipped_3x2" if flip_key else "latents_3x2"
    arrs = arrays_for(bucket, flip=True)
    arrs[key] = arr
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "c.npz"
        write_stock(p, arrs)
        s = one(p, bucket, flipped=True)
    dt = np.dtype(dtype)
    is_f4 = dt.kind == "f" and dt.itemsize == 4 and dt.byteorder in "=<|"
    good_shape = shape in {(16, 3, 2), (16, 1, 3, 2)}
    f_order = fortran and sum(n > 1 for n in shape) > 1
    want = "bad_dtype" if not is_f4 else "bad_shape" if not good_shape or f_order else "ok"
    check_status(s, p, want, key)
    if want != "ok":
        found = f"found {_dtype_name(dt)} {shape!r}"
        assert (found + (" in Fortran order" if want == "bad_shape" and good_shape else "")) in s.message


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(
    names=st.lists(st.text(NAME_CHARS, min_size=1, max_size=12), min_size=0, max_size=12, unique=True),
    compressed=st.booleans(),
)
def test_member_names_round_trip(names: list[str], compressed: bool) -> None:
    """Every name np.savez wrote comes back in the missing-key report."""
    assume(LAT not in names)
    rng = np.random.default_rng(len(names))
    arrs = {n: rng.standard_normal(int(rng.integers(0, 5))).astype(np.float32) for n in names}
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "c.npz"
        write_stock(p, arrs, compressed)
        s = one(p)
    check_status(s, p, "missing_key", LAT)
    listed = s.message.split("found entries: ", 1)[1]
    assert (set(listed.split(", ")) if names else {"none"}) == (set(names) or {"none"})


def _base_files() -> dict[str, bytes]:
    full = arrays_for((32, 16), flip=True, alpha=True, seed=7)
    out = {}
    with tempfile.TemporaryDirectory() as d:
        for name, write in [
            ("stored", lambda p: write_stock(p, full)),
            ("deflated", lambda p: write_stock(p, full, True)),
            ("aligned", lambda p: write_aligned(p, full)),
        ]:
            p = Path(d) / name
            write(p)
            out[name] = p.read_bytes()
    return out


BASE_FILES = _base_files()


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=300)
@given(
    base=st.sampled_from(sorted(BASE_FILES)),
    flips=st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 255)), max_size=6),
    cut=st.one_of(st.none(), st.integers(0, 2**31)),
    crc=st.booleans(),
    finite=st.booleans(),
)
def test_mutations_never_crash(
    base: str, flips: list[tuple[int, int]], cut: int | None, crc: bool, finite: bool
) -> None:
    data = bytearray(BASE_FILES[base])
    for at, v in flips:
        data[at % len(data)] = v
    if cut is not None:
        data = data[: cut % len(data)]
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "m.npz"
        p.write_bytes(bytes(data))
        s = one(p, (32, 16), flipped=True, alpha_mask=True, verify_crc=crc, check_finite=finite)
    assert s.code in CODES - {"missing", "io_error"}
    assert s.path == str(p) and s.ok is (s.code == "ok")
    assert (s.message == "") is s.ok
    if s.code != "ok":
        assert s.message.startswith(f"{p}: ")
    if not flips:
        assert s.code == ("ok" if cut is None else "empty" if not data else "truncated")
