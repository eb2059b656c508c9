"""``_core._prove_sources``, the drop-in's startup pass: its reading of the metadata member agrees
with Python's ``json`` wherever it proves an image's size, and refusing is the only way it differs."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from latentcache import _core
from npzgen import arrays_for, write_stock

BUCKET = (64, 32)


def _cache(path: Path, meta: bytes | None) -> Path:
    arrays = arrays_for(BUCKET)
    if meta is not None:
        arrays["latentcache_meta"] = np.frombuffer(meta, dtype=np.uint8)
    return write_stock(path, arrays)


def _reference(meta: bytes, image: Path) -> tuple[bool, str | None]:
    """The proof as the drop-in made it in Python: JSON object, ``source`` an object whose ``size``
    and ``mtime_ns`` equal the image's ``stat``; the ``vae`` when it is a str."""
    try:
        doc = json.loads(meta.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False, None
    if not isinstance(doc, dict) or not isinstance(doc.get("source"), dict):
        return False, None
    st_ = os.stat(image)
    fp = doc["source"]
    if st_.st_size != fp.get("size") or st_.st_mtime_ns != fp.get("mtime_ns"):
        return False, None
    vae = doc.get("vae")
    return True, vae if isinstance(vae, str) else None


def _refuse(name: str) -> Any:
    raise ValueError(f"{name} is not standard JSON")


def _strict_ints(meta: bytes) -> bool:
    """Whether ``meta`` is standard JSON (no ``NaN`` or ``Infinity`` and no lone surrogate, which
    Python accepts) whose last ``source`` has ``size`` and ``mtime_ns`` written as plain integers:
    the core reads no other spelling (``4.0`` or ``true`` prove nothing there)."""
    try:
        doc = json.loads(meta.decode("utf-8"), parse_constant=_refuse)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False
    try:
        # A lone surrogate (a damaged surrogate-pair escape): Python keeps it, the core refuses it.
        json.dumps(doc, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    src = doc.get("source") if isinstance(doc, dict) else None
    return isinstance(src, dict) and all(type(src.get(k)) is int for k in ("size", "mtime_ns"))


def _prove(cache: Path, image: Path) -> tuple[Any, bool, bool, str | None]:
    return _core._prove_sources([str(cache)], BUCKET, [str(image)])[0]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "img.png"
    p.write_bytes(b"\x89PNG" + bytes(100))
    return p


def test_a_cache_of_this_image_proves_it_and_a_changed_image_does_not(tmp_path: Path, image: Path) -> None:
    s = os.stat(image)
    meta = {"format": 1, "source": {"size": s.st_size, "mtime_ns": s.st_mtime_ns}, "vae": "v"}
    cache = _cache(tmp_path / "img_0064x0032_anima.npz", json.dumps(meta).encode())
    status, has_meta, proven, vae = _prove(cache, image)
    assert (status.ok, has_meta, proven, vae) == (True, True, True, "v")
    os.utime(image, ns=(s.st_atime_ns, s.st_mtime_ns + 1))
    assert _prove(cache, image)[1:] == (True, False, None)
    # A stock cache proves nothing and says it has no metadata; so does a broken one.
    stock = _cache(tmp_path / "stock_0064x0032_anima.npz", None)
    assert _prove(stock, image)[1:] == (False, False, None)
    broken = tmp_path / "broken_0064x0032_anima.npz"
    broken.write_bytes(cache.read_bytes()[:-10])
    status, has_meta, proven, _ = _prove(broken, image)
    assert (status.code, has_meta, proven) == ("truncated", False, False)


def test_images_must_pair_with_paths(tmp_path: Path, image: Path) -> None:
    with pytest.raises(ValueError, match="images"):
        _core._prove_sources([str(tmp_path / "a.npz"), str(tmp_path / "b.npz")], BUCKET, [str(image)])


_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
_JSON = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)


@st.composite
def _metas(draw: st.DrawFn) -> bytes:
    """Metadata members: mostly records whose fingerprint matches the image (as numbers, floats,
    bools, strings), with random neighbours, repeated keys, odd spacing and byte damage."""
    size, mtime = 104, draw(st.integers(min_value=0, max_value=2**62))
    spell = draw(st.sampled_from(["int", "float", "bool", "str", "other"]))
    as_value = {
        "int": lambda v: json.dumps(v),
        "float": lambda v: f"{v}.0",
        "bool": lambda v: "true",
        "str": lambda v: json.dumps(str(v)),
        "other": lambda v: json.dumps(draw(_JSON)),
    }[spell]
    fields = [f'"size": {as_value(size)}', f'"mtime_ns": {mtime}']
    extra = draw(st.dictionaries(st.text(max_size=6), _JSON, max_size=3))
    fields += [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in extra.items()]
    if draw(st.booleans()):
        fields.append(f'"size": {json.dumps(draw(st.sampled_from([size, size + 1])))}')
    draw(st.randoms()).shuffle(fields)
    sep = draw(st.sampled_from([",", ", ", " ,\n\t"]))
    vae = draw(st.one_of(st.none(), st.text(max_size=10), _JSON))
    top = [f'"source": {{{sep.join(fields)}}}', f'"vae": {json.dumps(vae)}', '"format": 1']
    draw(st.randoms()).shuffle(top)
    text = "{" + sep.join(top) + "}"
    raw = text.encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 5)) == 0:
        # Damage one byte.
        i = draw(st.integers(0, len(raw) - 1))
        raw = raw[:i] + bytes([draw(st.integers(0, 255))]) + raw[i + 1 :]
    return raw


@pytest.mark.parametrize(
    "meta",
    [
        # Python keeps a lone surrogate and proves; the core refuses: the slow way, never a wrong proof.
        b'{"source": {"size": 104, "mtime_ns": 0}, "vae": "\\ud83d\\u0e00"}',
        # Python (3.11+) refuses an integer of over 4300 digits; the core refuses long numbers too.
        b'{"source": {"size": 104, "mtime_ns": 0}, "pad": ' + b"1" * 5000 + b"}",
    ],
)
def test_documents_python_reads_otherwise_prove_nothing(tmp_path: Path, image: Path, meta: bytes) -> None:
    os.utime(image, ns=(0, 0))
    cache = _cache(tmp_path / "img_0064x0032_anima.npz", meta)
    assert _prove(cache, image)[1:] == (True, False, None)
    assert not _strict_ints(meta)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(meta=_metas())
def test_the_core_proves_exactly_what_python_json_proves_from_integers(
    tmp_path: Path, image: Path, meta: bytes
) -> None:
    os.utime(image, ns=(0, json_mtime(meta) or 0))
    cache = _cache(tmp_path / "img_0064x0032_anima.npz", meta)
    status, has_meta, proven, vae = _prove(cache, image)
    assert status.ok and has_meta
    want_proven, want_vae = _reference(meta, image)
    if proven:
        # Whatever the core proves, Python's reading proves too, with the same VAE.
        assert (want_proven, want_vae) == (True, vae)
    elif want_proven:
        # It refuses only spellings it does not read (4.0, true for 1), never an integer record.
        assert not _strict_ints(meta), meta
    else:
        assert vae is None


def json_mtime(meta: bytes) -> int | None:
    """The ``source.mtime_ns`` Python reads from ``meta``, when it is a usable integer."""
    try:
        doc = json.loads(meta.decode("utf-8"))
        v = doc["source"]["mtime_ns"]
    except (UnicodeDecodeError, ValueError, RecursionError, TypeError, KeyError):
        return None
    if type(v) is int and 0 <= v < 2**62:
        return v
    if type(v) is float and math.isfinite(v) and 0 <= v < 2**62:
        return int(v)
    return None
