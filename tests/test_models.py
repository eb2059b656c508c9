"""The model schema: every sd-scripts latent cache kind validated, loaded, merged and told apart."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import latentcache as lc
import numpy as np
import pytest
from latentcache import _core, models
from latentcache.errors import LatentCacheError, NpzFormatError
from latentcache.models import ModelSchema

ALL = list(models.names())


def bucket_of(m: ModelSchema, h: int, w: int) -> tuple[int, int]:
    """The bucket ``(W, H)`` in pixels of latents of ``h x w`` cells."""
    return (w * m.stride, h * m.stride)


def sd_scripts_arrays(
    m: ModelSchema,
    h: int,
    w: int,
    *,
    seed: int = 0,
    flip: bool = False,
    alpha: bool = False,
    int_crop: bool = False,
) -> dict[str, np.ndarray]:
    """One resolution's arrays as sd-scripts' ``save_latents_to_disk`` makes them: float32 latents
    in the model's own encoder layout (Anima's video VAE gives ``(16, 1, h, w)``), ``np.array`` of
    the original size (int64) and of the crop (ints or floats), a float32 alpha mask at bucket
    pixel size."""
    rng = np.random.default_rng(seed)
    shape = (m.channels, 1, h, w) if "c1hw" in m.layouts else (m.channels, h, w)
    bw, bh = bucket_of(m, h, w)
    out: dict[str, np.ndarray] = {
        m.key(m.keys.latents, h, w): rng.standard_normal(shape).astype(np.float32),
        m.key(m.keys.original_size, h, w): np.array([bw + 3, bh + 5]),
        m.key(m.keys.crop_ltrb, h, w): np.array([0, 0, bw, bh]) if int_crop else np.array([0.5, 0, bw, bh]),
    }
    if flip:
        out[m.key(m.keys.latents_flipped, h, w)] = rng.standard_normal(shape).astype(np.float32)
    if alpha:
        out[m.key(m.keys.alpha_mask, h, w)] = rng.random((bh, bw)).astype(np.float32)
    return out


def savez(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def cache_name(tmp_path: Path, m: ModelSchema, h: int, w: int) -> Path:
    return Path(lc.cache_path(tmp_path / "img.png", bucket_of(m, h, w), model=m.name))


def test_original_size_is_int64_as_sd_scripts_writes_it() -> None:
    # save_latents_to_disk stores np.array(original_size) of Python ints.
    arrays = sd_scripts_arrays(models.get("sd"), 2, 3)
    assert arrays["original_size"].dtype == np.int64


def test_the_python_and_rust_registries_agree() -> None:
    core = _core.model_schemas()
    assert [d["name"] for d in core] == ALL
    assert models.names()[0] == models.DEFAULT_MODEL == "anima"
    for d in core:
        m = models.get(str(d["name"]))
        assert d["suffix"] == m.suffix
        assert tuple(d["legacy_suffixes"]) == m.legacy_suffixes
        assert d["channels"] == m.channels
        assert d["stride"] == m.stride
        assert d["multi_resolution"] == m.multi_resolution
        assert tuple(d["keys"]) == m.keys.all()
        assert tuple(d["layouts"]) == m.layouts
        assert d["takes"] == m.takes
        norm = {k: tuple(v) if isinstance(v, list) else v for k, v in d["norm"].items()}
        assert norm == dataclasses.asdict(m.norm)
        assert models.by_suffix(f"d/a_0001x0001{m.suffix}") is m


def test_the_schemas_are_sd_scripts() -> None:
    # library/strategy_*.py: suffixes, strides, multi_resolution, and each VAE's channels.
    table = {m: (models.get(m).suffix, models.get(m).channels, models.get(m).stride) for m in ALL}
    assert table == {
        "anima": ("_anima.npz", 16, 8),
        "sd": ("_sd.npz", 4, 8),
        "sdxl": ("_sdxl.npz", 4, 8),
        "flux": ("_flux.npz", 16, 8),
        "sd3": ("_sd3.npz", 16, 8),
        "lumina": ("_lumina.npz", 16, 8),
        "hunyuan_image": ("_hi.npz", 64, 32),
    }
    assert [m for m in ALL if not models.get(m).multi_resolution] == ["sd", "sdxl"]
    assert models.get("sd").legacy_suffixes == models.get("sdxl").legacy_suffixes == (".npz",)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("extras", [(False, False), (True, True)])
def test_a_stock_cache_validates_loads_and_merges(
    tmp_path: Path, name: str, extras: tuple[bool, bool]
) -> None:
    m = models.get(name)
    flip, alpha = extras
    h, w = 6, 4
    bucket = bucket_of(m, h, w)
    p = savez(
        cache_name(tmp_path, m, h, w), sd_scripts_arrays(m, h, w, flip=flip, alpha=alpha, int_crop=flip)
    )
    st = lc.validate(
        [p], bucket, flipped=flip, alpha_mask=alpha, model=name, verify_crc=True, check_finite=True
    )
    assert [s.code for s in st] == ["ok"], st[0].message
    assert lc.validate([p], bucket, model=m)[0].ok  # a ModelSchema works as well as its name

    # Loaded bit for bit as np.load reads it, by load and load_batch.
    with np.load(p) as z:
        ref = {k: z[k] for k in z.files}
    for copy in (False, True):
        got = lc.load(p, bucket, model=name, copy=copy)
        np.testing.assert_array_equal(got.latents, ref[m.key("latents", h, w)], strict=True)
        assert got.original_size == ref[m.key("original_size", h, w)].tolist()
        assert got.crop_ltrb == ref[m.key("crop_ltrb", h, w)].tolist()
        if flip:
            assert got.latents_flipped is not None
            np.testing.assert_array_equal(
                got.latents_flipped, ref[m.key("latents_flipped", h, w)], strict=True
            )
        else:
            assert got.latents_flipped is None
        if alpha:
            assert got.alpha_mask is not None
            np.testing.assert_array_equal(got.alpha_mask, ref[m.key("alpha_mask", h, w)], strict=True)
    batch = lc.load_batch([p, p], bucket, flipped=[False, flip], model=name)
    assert batch.shape == (2, m.channels, h, w)
    np.testing.assert_array_equal(batch[0], ref[m.key("latents", h, w)].reshape(m.channels, h, w))
    if flip:
        np.testing.assert_array_equal(batch[1], ref[m.key("latents_flipped", h, w)].reshape(m.channels, h, w))

    # Merged by the writer: a second resolution for a multi-resolution kind, a replacement for bare
    # keys; the other resolution's members stay byte for byte.
    h2, w2 = 2, 3
    bucket2 = bucket_of(m, h2, w2)
    new = np.arange(m.channels * h2 * w2, dtype=np.float32).reshape(m.channels, h2, w2)
    mask = np.ones((h2 * m.stride, w2 * m.stride), np.float32)
    lc.write_latents(
        p, latents=new, original_size=bucket2, crop_ltrb=(0, 0, *bucket2), alpha_mask=mask, model=name
    )
    with np.load(p) as z:
        files = set(z.files) - {"latentcache_meta"}
        if m.multi_resolution:
            assert files == set(ref) | {
                m.key(k, h2, w2) for k in ("latents", "original_size", "crop_ltrb", "alpha_mask")
            }
            for k, v in ref.items():
                np.testing.assert_array_equal(z[k], v, strict=True)
        else:
            assert files == {"latents", "original_size", "crop_ltrb", "alpha_mask"}
        np.testing.assert_array_equal(z[m.key("latents", h2, w2)], new, strict=True)
    assert lc.validate([p], bucket2, alpha_mask=True, model=name)[0].ok
    again = lc.load(p, bucket2, model=name)
    np.testing.assert_array_equal(again.latents, new, strict=True)
    assert again.original_size == list(bucket2)
    if m.multi_resolution:
        assert lc.validate([p], bucket, flipped=flip, alpha_mask=alpha, model=name)[0].ok
        np.testing.assert_array_equal(lc.load(p, bucket, model=name).latents, ref[m.key("latents", h, w)])
    # verify_directory finds it by the model's suffix and checks every resolution it holds.
    checked = lc.verify_directory(tmp_path, model=name)
    assert [s.code for s in checked] == ["ok"] * (2 if m.multi_resolution else 1), [
        s.message for s in checked
    ]


def _neutral_code(held: ModelSchema, asked: ModelSchema, shape: tuple[int, ...]) -> str:
    """What validate says of a cache of ``held`` checked as ``asked``, by its contents alone."""
    if held.multi_resolution != asked.multi_resolution or (
        held.multi_resolution and held.stride != asked.stride
    ):
        return "missing_key"  # bare keys against `_{h}x{w}` ones, or another `h x w` for the bucket
    return "ok" if asked.accepts_shape(shape) else "bad_shape"


@pytest.mark.parametrize("held", ALL)
def test_a_cache_of_one_model_checked_as_another_is_refused(tmp_path: Path, held: str) -> None:
    m = models.get(held)
    h, w = 4, 4
    bucket = bucket_of(m, h, w)
    arrays = sd_scripts_arrays(m, h, w)
    named = savez(cache_name(tmp_path, m, h, w), arrays)
    neutral = tmp_path / "plain.npz"
    shutil.copyfile(named, neutral)
    shape = arrays[m.key("latents", h, w)].shape
    for asked in ALL:
        a = models.get(asked)
        st = lc.validate([named, neutral], bucket, model=asked)
        if asked == held:
            assert [s.code for s in st] == ["ok", "ok"]
            continue
        # Its name says which model it is: several kinds share one layout (Anima, FLUX, SD3 and
        # Lumina; SD and SDXL), so only the name can tell them apart.
        assert st[0].code == "wrong_model", (asked, st[0].message)
        msg = st[0].message.replace('"', "'")
        assert repr(held) in msg and repr(asked) in msg
        assert st[1].code == _neutral_code(m, a, shape), (asked, st[1].message)
        if st[1].code == "bad_shape":
            assert f"({a.channels}, " in st[1].message
        # The writer refuses such a name too, and the verify of a folder finds only its own kind.
        with pytest.raises(ValueError, match="named as a"):
            lc.write_latents(
                named,
                latents=np.zeros((a.channels, h, w), np.float32),
                original_size=(8, 8),
                crop_ltrb=(0, 0, 8, 8),
                model=asked,
            )
    assert lc.validate([named], bucket, model=held)[0].ok  # the refused writes left it alone


def test_the_status_codes_include_wrong_model() -> None:
    assert "wrong_model" in lc.status_codes()


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_the_legacy_plain_npz_of_sd_is_read(tmp_path: Path, name: str) -> None:
    m = models.get(name)
    p = savez(tmp_path / "cat.npz", sd_scripts_arrays(m, 3, 5, flip=True))
    (tmp_path / "cat.png").write_bytes(b"img")
    bucket = bucket_of(m, 3, 5)
    assert lc.validate([p], bucket, flipped=True, model=name)[0].ok
    assert lc.load(p, bucket, model=name).latents.shape == (4, 3, 5)
    assert lc.find_source_image(p, model=name) == str(tmp_path / "cat.png")
    # A multi-resolution model has no legacy name.
    with pytest.raises(lc.CachePathError):
        lc.find_source_image(p, model="anima")


def test_paths_and_scan_take_the_model(tmp_path: Path) -> None:
    assert lc.cache_path("d/a.png", (64, 32), model="sdxl") == "d/a_0064x0032_sdxl.npz"
    assert lc.cache_path("d/a.png", (64, 32), model=models.get("hunyuan_image")) == "d/a_0064x0032_hi.npz"
    assert lc.cache_path("d/a.png", (64, 32), suffix="_flux.npz") == "d/a_0064x0032_flux.npz"
    assert lc.parse_cache_path("d/a_0064x0032_sd3.npz", model="sd3") == ("d/a", (64, 32))
    assert lc.parse_cache_path("d/a_0064x0032_sd3.npz", suffix="_sd3.npz") == ("d/a", (64, 32))
    with pytest.raises(lc.CachePathError):
        lc.parse_cache_path("d/a_0064x0032_sd3.npz")  # Anima's suffix by default
    (tmp_path / "a.png").write_bytes(b"x")
    for name in ALL:
        m = models.get(name)
        savez(Path(lc.cache_path(tmp_path / "a.png", (64, 64), model=name)), sd_scripts_arrays(m, 2, 2))
    for name in ALL:
        report = lc.scan_directory(tmp_path, model=name)
        assert [c.path for i in report.images for c in i.caches] == [
            lc.cache_path(tmp_path / "a.png", (64, 64), model=name)
        ]
        assert lc.find_source_image(report.images[0].caches[0].path, model=name) == str(tmp_path / "a.png")


@pytest.mark.parametrize(
    "call",
    [
        lambda: lc.cache_path("a.png", (1, 2), suffix="_sd.npz", model="anima"),
        lambda: lc.parse_cache_path("a_0001x0002_sd.npz", suffix="_sd.npz", model="anima"),
        lambda: lc.find_source_image("a_0001x0002_sd.npz", suffix="_sd.npz", model="anima"),
        lambda: lc.scan_directory(".", suffix="_sd.npz", model="anima"),
        lambda: lc.validate(["a_0001x0002_sd.npz"], (8, 8), suffix="_sd.npz", model="anima"),
        lambda: lc.verify_directory(".", suffix="_sd.npz", model="anima"),
        lambda: lc.stale_reason("a_0001x0002_sd.npz", suffix="_sd.npz", model="anima"),
    ],
)
def test_a_suffix_of_another_model_is_a_value_error_naming_both(call: Any) -> None:
    with pytest.raises(ValueError, match=r"'sd'.*'anima'|\"sd\".*\"anima\""):
        call()


def test_an_unknown_model_is_a_value_error(tmp_path: Path) -> None:
    for call in (
        lambda: lc.cache_path("a.png", (1, 2), model="nope"),
        lambda: lc.validate([tmp_path / "a.npz"], (8, 8), model="nope"),
        lambda: lc.load(tmp_path / "a.npz", (8, 8), model="nope"),
        lambda: lc.load_batch([], (8, 8), model="nope"),
    ):
        with pytest.raises(ValueError, match="unknown model 'nope'|unknown model \"nope\""):
            call()
    with pytest.raises(TypeError, match="model must be"):
        lc.cache_path("a.png", (1, 2), model=3)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "shape", "match"),
    [
        ("anima", (15, 2, 2), r"\(16, h, w\) or \(16, 1, h, w\)"),
        ("anima", (4, 2, 2), r".* for model 'anima', got \(4, 2, 2\)"),
        ("sd", (16, 2, 2), r"\(4, h, w\) with no zero"),
        ("sd", (4, 1, 2, 2), r"\(4, h, w\)"),
        ("flux", (16, 1, 2, 2), r"\(16, h, w\)"),
        ("hunyuan_image", (16, 2, 2), r"\(64, h, w\)"),
    ],
)
def test_the_writer_refuses_a_layout_the_model_does_not_store(
    tmp_path: Path, name: str, shape: tuple[int, ...], match: str
) -> None:
    p = tmp_path / "v.npz"
    with pytest.raises(ValueError, match=f"v.npz: latents must have shape {match}"):
        lc.write_latents(
            p, latents=np.zeros(shape, np.float32), original_size=(8, 8), crop_ltrb=(0,) * 4, model=name
        )
    assert not p.exists()


def test_the_alpha_mask_takes_the_model_stride(tmp_path: Path) -> None:
    p = tmp_path / "v.npz"
    lat = np.zeros((64, 2, 3), np.float32)
    with pytest.raises(ValueError, match=r"\(H, W\) = \(64, 96\)"):
        lc.write_latents(
            p,
            latents=lat,
            original_size=(96, 64),
            crop_ltrb=(0,) * 4,
            alpha_mask=np.ones((16, 24), np.float32),
            model="hunyuan_image",
        )
    lc.write_latents(
        p,
        latents=lat,
        original_size=(96, 64),
        crop_ltrb=(0,) * 4,
        alpha_mask=np.ones((64, 96), np.float32),
        model="hunyuan_image",
    )
    assert lc.validate([p], (96, 64), alpha_mask=True, model="hunyuan_image")[0].ok


def test_load_of_another_models_cache_names_the_missing_key(tmp_path: Path) -> None:
    p = savez(tmp_path / "a.npz", sd_scripts_arrays(models.get("sdxl"), 2, 2))
    with pytest.raises(NpzFormatError, match="latents_2x2"):
        lc.load(p, (16, 16))
    with pytest.raises(NpzFormatError, match="latents"):
        lc.load_batch([p], (16, 16))


def test_npz_format_error_is_a_value_error(tmp_path: Path) -> None:
    assert issubclass(NpzFormatError, ValueError) and issubclass(NpzFormatError, LatentCacheError)
    p = tmp_path / "a.npz"
    p.write_bytes(b"not a zip at all")
    with pytest.raises(ValueError):
        lc.load(p, (16, 16))


# --- VAE fingerprints ---------------------------------------------------------------------------


def _written(path: Path, vae: str | None) -> Path:
    meta = {"vae": vae, "vae_dtype": "bf16"} if vae is not None else None
    lc.write_latents(
        path, latents=np.ones((16, 2, 2), np.float32), original_size=(16, 16), crop_ltrb=(0,) * 4, meta=meta
    )
    return path


def test_a_cache_made_with_another_vae_is_stale(tmp_path: Path) -> None:
    same = _written(tmp_path / "a_0016x0016_anima.npz", "vae-A")
    other = _written(tmp_path / "b_0016x0016_anima.npz", "vae-B")
    unrecorded = _written(tmp_path / "c_0016x0016_anima.npz", None)
    stock = savez(tmp_path / "d_0016x0016_anima.npz", sd_scripts_arrays(models.get("anima"), 2, 2))
    paths = [same, other, unrecorded, stock]
    assert [s.code for s in lc.validate(paths, (16, 16))] == ["ok"] * 4
    got = lc.validate(paths, (16, 16), vae="vae-A")
    assert [s.code for s in got] == ["ok", "stale", "ok", "ok"]
    assert "'vae-B'" in got[1].message and "'vae-A'" in got[1].message and str(other) in got[1].message
    # With the source check as well, and through verify_directory and stale_reason.
    assert [s.code for s in lc.validate(paths, (16, 16), vae="vae-A", check_source=True)] == [
        "ok",
        "stale",
        "ok",
        "ok",
    ]
    by_path = {s.path: s.code for s in lc.verify_directory(tmp_path, vae="vae-A")}
    assert by_path == {str(same): "ok", str(other): "stale", str(unrecorded): "ok", str(stock): "ok"}
    assert lc.stale_reason(same, vae="vae-A") is None
    reason = lc.stale_reason(other, vae="vae-A")
    assert reason is not None and "vae-B" in reason and "vae-A" in reason
    assert lc.stale_reason(other) is None  # no fingerprint given: not compared
    assert lc.stale_reason(stock, vae="vae-A") is None


def test_a_broken_cache_stays_broken_under_the_vae_check(tmp_path: Path) -> None:
    p = tmp_path / "a_0016x0016_anima.npz"
    p.write_bytes(b"PK\x03\x04")
    assert lc.validate([p], (16, 16), vae="vae-A")[0].code == "truncated"
