"""Canonical cache paths: properties and hand-picked tables."""

from __future__ import annotations

import ntpath
import os
import pickle
import posixpath
import unicodedata
from pathlib import Path

import latentcache as lc
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from latentcache.errors import CachePathError, LatentCacheError

SUFFIX = "_anima.npz"
IMAGE_EXTS = [".png", ".jpg", ".jpeg", ".webp", ".bmp", ".PNG", ".JPG", ".JPEG", ".WEBP", ".BMP"]

# Stems built from the characters that make names tricky: dots, underscores, digits, 'x', non-ASCII.
stem_chars = st.sampled_from(list("ab_x.09-é猫 ") + ["\u0301"])
stems = st.text(stem_chars, min_size=1, max_size=24).filter(lambda s: s.strip(".") != "")
sizes = st.tuples(st.integers(1, 20000), st.integers(1, 20000))
dirs = st.lists(st.text(st.sampled_from(list("abc_.é")), min_size=1, max_size=6), max_size=3).map(
    lambda parts: "/".join(p for p in parts if p not in (".", "..")),
)


@st.composite
def image_paths(draw: st.DrawFn) -> str:
    d = draw(dirs)
    stem = draw(stems)
    # Sometimes the stem itself looks like a size or like a cache name without the extension.
    stem = draw(st.sampled_from([stem, stem + "_0512x0512", stem + "_0602x0429_anima", "x_0512x0512"]))
    ext = draw(st.sampled_from(IMAGE_EXTS))
    return f"{d}/{stem}{ext}" if d else f"{stem}{ext}"


def expected_name(image: str, size: tuple[int, int]) -> str:
    return posixpath.splitext(image)[0] + f"_{size[0]:04d}x{size[1]:04d}" + SUFFIX


@given(image_paths(), sizes, sizes)
def test_cache_path_is_idempotent(p: str, s1: tuple[int, int], s2: tuple[int, int]) -> None:
    assert lc.cache_path(lc.cache_path(p, s1), s2) == lc.cache_path(p, s2)


@given(image_paths(), sizes)
def test_cache_path_matches_sd_scripts_naming(p: str, s: tuple[int, int]) -> None:
    # For an image path, the name is exactly what sd-scripts builds, so existing caches stay valid.
    assert lc.cache_path(p, s) == expected_name(p, s)


@given(image_paths(), sizes)
def test_parse_inverts_cache_path(p: str, s: tuple[int, int]) -> None:
    assert lc.parse_cache_path(lc.cache_path(p, s)) == (posixpath.splitext(p)[0], s)


@given(st.text(min_size=1, max_size=40), sizes, sizes)
def test_idempotent_for_any_string(p: str, s1: tuple[int, int], s2: tuple[int, int]) -> None:
    assume("\x00" not in p)
    try:
        first = lc.cache_path(p, s1)
    except CachePathError:
        return  # no file name (e.g. "dir/"): refused, never a wrong name
    assert lc.cache_path(first, s2) == lc.cache_path(p, s2)


def test_doubled_suffix_table() -> None:
    # The sd-scripts #2362 second run: the cache name handed back as the image path.
    assert lc.cache_path("d/a_0602x0429_anima.npz", (602, 429)) == "d/a_0602x0429_anima.npz"
    assert lc.parse_cache_path("d/a_0602x0429_anima_0602x0429_anima.npz") == (
        "d/a_0602x0429_anima",
        (602, 429),
    )
    # A stem that looks like a size keeps it.
    assert lc.cache_path("x_0512x0512.png", (1024, 768)) == "x_0512x0512_1024x0768_anima.npz"
    assert lc.cache_path("a.b.png", (8, 8)) == "a.b_0008x0008_anima.npz"
    assert lc.cache_path("img12345.png", (12345, 7)) == "img12345_12345x0007_anima.npz"
    assert lc.cache_path(Path("d") / "猫.webp", (1, 2)) == "d/猫_0001x0002_anima.npz"
    long = "d/" + "a" * 240 + ".png"
    assert lc.parse_cache_path(lc.cache_path(long, (3, 4))) == (long[:-4], (3, 4))
    assert lc.cache_path("a.png", (1, 2), suffix="_flux.npz") == "a_0001x0002_flux.npz"


@pytest.mark.parametrize(
    "name",
    [
        "a.npz",
        "my_anima.npz",
        "a_0512_anima.npz",
        "a_0512x_anima.npz",
        "a_x0512_anima.npz",
        "a_0512x0512_flux.npz",
        "a_05l2x0512_anima.npz",
        "d/_0512x0512_anima.npz",
        "a_0512x0512_anima.npz.bak",
        "a_0512X0512_anima.npz",
    ],
)
def test_not_cache_names(name: str) -> None:
    with pytest.raises(CachePathError, match=name.replace(".", r"\.")):
        lc.parse_cache_path(name)


def test_errors_are_picklable_and_rooted() -> None:
    with pytest.raises(LatentCacheError) as info:
        lc.parse_cache_path("d/notes.npz")
    again = pickle.loads(pickle.dumps(info.value))
    assert type(again) is CachePathError and str(again) == str(info.value)
    assert issubclass(lc.NpzFormatError, LatentCacheError)
    with pytest.raises(ValueError, match="suffix"):
        lc.cache_path("a.png", (1, 1), suffix="")


@pytest.mark.parametrize(
    ("path", "key"),
    [
        (r"C:\Data\.\x\..\Img.PNG", "c:/data/img.png"),
        ("C:/Data//Img.png", "c:/data/img.png"),
        (r"C:\Data/sub\\img.png", "c:/data/sub/img.png"),
        (r"c:\data\..\..\img.png", "c:/img.png"),
        (r"\\Server\Share\a\..\b.png", "//server/share/b.png"),
        (r"\\server\share\..\..\b.png", "//server/share/b.png"),
    ],
)
def test_path_key_windows(path: str, key: str) -> None:
    assert lc.path_key(path) == key


@pytest.mark.parametrize(
    ("path", "key"),
    [
        ("a//b/./c/../d.png", "a/b/d.png"),
        ("/x/../../a.png", "/a.png"),
        ("../a/../b", "../b"),
        ("./", "."),
        ("a/b/", "a/b"),
    ],
)
def test_path_key_posix(path: str, key: str) -> None:
    assert lc.path_key(path, casefold=False) == key


def test_path_key_unicode_and_case() -> None:
    nfc = unicodedata.normalize("NFC", "données/é.png")
    nfd = unicodedata.normalize("NFD", nfc)
    assert nfc != nfd
    assert lc.path_key(nfc) == lc.path_key(nfd)
    assert lc.path_key("A/B.PNG", casefold=True) == "a/b.png"
    assert lc.path_key("A/B.PNG", casefold=False) == "A/B.PNG"
    if os.name == "posix" and not os.uname().sysname == "Darwin":
        # A POSIX path keeps its backslashes and its case by default.
        assert lc.path_key(r"A\b.png") == r"A\b.png"


@given(st.lists(st.sampled_from(["a", "B", "é", ".", "..", "", "c d"]), max_size=8))
def test_path_key_agrees_with_normpath(parts: list[str]) -> None:
    p = "/r/" + "/".join(parts)  # (normpath keeps a leading "//"; path_key collapses it)
    assert lc.path_key(p, casefold=False) == unicodedata.normalize("NFC", posixpath.normpath(p))
    w = "C:\\" + "\\".join(parts)
    assert lc.path_key(w) == unicodedata.normalize("NFC", ntpath.normpath(w)).replace("\\", "/").lower()


@pytest.mark.parametrize("size", [(-1, 0), (0, 10), (10, 0), (2**32, 1)])
def test_cache_path_refuses_a_size_that_is_not_two_positive_integers(size: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match=rf"a\.png: image_size must be two positive integers .*{size[0]}"):
        lc.cache_path("d/a.png", size)


def test_suffix_and_model_are_keyword_only_and_positional_suffix_is_deprecated(tmp_path: Path) -> None:
    import inspect

    for f in (lc.cache_path, lc.parse_cache_path, lc.find_source_image, lc.scan_directory, lc.stale_reason):
        params = inspect.signature(f).parameters
        for name in ("suffix", "model"):
            assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, (f.__name__, name)
    assert inspect.signature(lc.open).parameters["model"].kind is inspect.Parameter.KEYWORD_ONLY
    for f in (lc.load, lc.load_batch, lc.validate, lc.verify_directory, lc.write_latents):
        params = inspect.signature(f).parameters
        assert params["model"].kind is inspect.Parameter.KEYWORD_ONLY, f.__name__
        assert "suffix" not in params or params["suffix"].kind is inspect.Parameter.KEYWORD_ONLY
    with pytest.warns(DeprecationWarning, match=r"cache_path\(\): passing suffix= by position") as rec:
        assert lc.cache_path("a.png", (1, 2), "_flux.npz") == "a_0001x0002_flux.npz"
    assert rec[0].filename == __file__
    with pytest.warns(DeprecationWarning, match="suffix="):
        assert lc.parse_cache_path("a_0001x0002_flux.npz", "_flux.npz") == ("a", (1, 2))
    with pytest.warns(DeprecationWarning, match="suffix=, recursive="):
        assert lc.scan_directory(tmp_path, "_anima.npz", True).is_clean
    with pytest.raises(TypeError, match="multiple values"):
        lc.cache_path("a.png", (1, 2), "_flux.npz", suffix="_flux.npz")
    with pytest.raises(TypeError, match="positional"):
        lc.cache_path("a.png", (1, 2), "_flux.npz", "extra")
