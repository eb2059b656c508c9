"""The pipelined encoder (``latentcache.encode.pipeline``) and its preprocessing (``...encode.preprocess``).

Everything runs on the CPU with a tiny randomly initialised diffusers ``AutoencoderKLQwenImage`` behind
``build_encoder``. Preprocessing is checked bit for bit against the Anima strategy's own functions
(``latentcache.anima``) and, with ``SD_SCRIPTS_DIR`` set, against sd-scripts' functions themselves. The
pipeline's caches are checked bit for bit against a serial reference (preprocess, ``ToTensor`` +
``Normalize`` arithmetic on the CPU, encode, ``write_latents``). Robustness: simulated CUDA out of memory,
corrupt and missing images, NaN latents, SIGTERM/SIGKILL mid-run and a rerun that encodes only what is
missing, bounded queues. ``gpu`` tests check pinned staging and non-blocking copies where CUDA exists.
"""

from __future__ import annotations

import ast
import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import latentcache as lc
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from latentcache import anima

torch = pytest.importorskip("torch")
PIL_Image = pytest.importorskip("PIL.Image")
pytest.importorskip("diffusers")

from latentcache.encode import distributed, pipeline, preprocess  # noqa: E402
from latentcache.encode.pipeline import EncodedImage, EncodeItem, encode_items  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
needs_cv2 = pytest.mark.skipif(not preprocess.cv2_available(), reason="opencv-python-headless not installed")


# -- helpers ----------------------------------------------------------------------------------------


def make_vae(seed: int = 0) -> Any:
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1).eval()


@pytest.fixture(scope="module")
def encoder() -> Any:
    from latentcache.encode.encoders import build_encoder

    return build_encoder(make_vae(), "anima")


class PerImage:
    """The encoder applied one image at a time: batch composition cannot change a single bit."""

    def __init__(self, enc: Any) -> None:
        self.enc = enc
        self.device, self.dtype, self.fingerprint = enc.device, enc.dtype, enc.fingerprint
        self.channels, self.stride, self.folded = enc.channels, enc.stride, enc.folded
        self.calls: list[int] = []

    def __call__(self, x: Any) -> Any:
        self.calls.append(int(x.shape[0]))
        return torch.cat([self.enc(x[i : i + 1]) for i in range(x.shape[0])])


class OomAbove(PerImage):
    """Raises a CUDA out-of-memory error for forwards of more than ``limit`` images."""

    def __init__(self, enc: Any, limit: int, error: type[BaseException] | None = None) -> None:
        super().__init__(enc)
        self.limit = limit
        self.error = error

    def __call__(self, x: Any) -> Any:
        if x.shape[0] > self.limit:
            if self.error is None:
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
            raise self.error("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().__call__(x)


def write_image(path: Path, w: int, h: int, *, seed: int = 0, alpha: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 4 if alpha else 3), dtype=np.uint8)
    if alpha:
        arr[..., 3] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    img = PIL_Image.fromarray(arr, "RGBA" if alpha else "RGB")
    if path.suffix == ".jpg":
        img.save(path, quality=90)
    else:
        img.save(path)
    return path


def dataset(
    tmp_path: Path, n: int, *, flip: bool = False, alpha: bool = False, buckets: tuple = ((64, 64), (96, 64))
) -> list[EncodeItem]:
    items = []
    for i in range(n):
        bucket = buckets[i % len(buckets)]
        # Some smaller than their bucket (Lanczos up), some larger (area down), odd aspect ratios.
        w = int(bucket[0] * (0.7 + 0.15 * (i % 7)))
        h = int(bucket[1] * (0.75 + 0.13 * (i % 5)))
        ext = ".jpg" if i % 3 == 2 and not alpha else ".png"
        p = write_image(tmp_path / f"{'rgba' if alpha else 'img'}{i:03d}{ext}", w, h, seed=i, alpha=alpha)
        items.append(
            EncodeItem(str(p), lc.cache_path(str(p), (w, h)), bucket, flip=flip and i % 2 == 0, alpha=alpha)
        )
    return items


def reference(items: list[EncodeItem], enc: Any, out: Path) -> dict[str, Path]:
    """The serial reference: anima.py's preprocessing and CPU normalisation, encode, write_latents."""
    paths = {}
    for it in items:
        img = anima.load_image(it.image_path, it.alpha)
        size = (img.shape[1], img.shape[0])
        resized = preprocess.resized_size_for(size, it.bucket)
        img, original = anima.resize_and_crop(img, resized, it.bucket, False)
        rgb = np.ascontiguousarray(img[:, :, :3]).astype(np.float32) / 255.0
        x = torch.from_numpy((rgb - 0.5) / 0.5).permute(2, 0, 1).unsqueeze(0).contiguous()
        with torch.inference_mode():
            lat = enc(x)[0]
            lat_f = enc(torch.flip(x, dims=[3]))[0] if it.flip else None
        mask = img[:, :, 3].astype(np.float32) / 255.0 if it.alpha else None
        target = out / Path(it.cache_path).name
        lc.write_latents(
            target,
            latents=lat.numpy(),
            original_size=np.asarray(original),
            crop_ltrb=np.asarray(anima.crop_ltrb(it.bucket, original)),
            latents_flipped=None if lat_f is None else lat_f.numpy(),
            alpha_mask=mask,
        )
        paths[it.cache_path] = target
    return paths


def arrays(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files if k != "latentcache_meta"}


def all_valid(items: list[EncodeItem]) -> list[str]:
    statuses = lc.validate(
        [it.cache_path for it in items],
        [it.bucket for it in items],
        flipped=[it.flip for it in items],
        alpha_mask=[it.alpha for it in items],
        check_source=True,
    )
    return [s.code for s in statuses]


# -- preprocessing ------------------------------------------------------------------------------------


@needs_cv2
@given(
    w=st.integers(16, 300),
    h=st.integers(16, 300),
    bucket=st.sampled_from([(64, 64), (96, 64), (64, 128), (128, 96), (32, 160)]),
    channels=st.sampled_from([3, 4]),
)
def test_preprocess_is_bit_equal_to_the_anima_strategy(w: int, h: int, bucket: tuple, channels: int) -> None:
    img = np.random.default_rng(w * 1000 + h).integers(0, 256, (h, w, channels), dtype=np.uint8)
    resized = preprocess.resized_size_for((w, h), bucket)
    assert resized[0] >= bucket[0] and resized[1] >= bucket[1]
    got = preprocess.preprocess_image(img, bucket, alpha=channels == 4)
    want, original = anima.resize_and_crop(img, resized, bucket, False)
    assert got.original_size == original == (w, h)
    assert got.crop_ltrb == anima.crop_ltrb(bucket, (w, h))
    assert got.pixels.flags.c_contiguous and got.pixels.dtype == np.uint8
    np.testing.assert_array_equal(got.pixels, want[:, :, :3])
    if channels == 4:
        assert got.alpha_mask is not None and got.alpha_mask.dtype == np.float32
        np.testing.assert_array_equal(got.alpha_mask, want[:, :, 3].astype(np.float32) / 255.0)


def test_preprocess_from_a_file_matches_prepare_pixels_standalone(tmp_path: Path) -> None:
    infos = []
    for i, (w, h, bucket) in enumerate([(200, 150, (96, 64)), (50, 70, (64, 128)), (64, 64, (64, 64))]):
        p = write_image(tmp_path / f"a{i}.png", w, h, seed=i, alpha=True)
        infos.append(
            SimpleNamespace(
                absolute_path=str(p), image=None, bucket_reso=bucket,
                resized_size=preprocess.resized_size_for((w, h), bucket),
            )
        )  # fmt: skip
    for info in infos:
        pixels, masks, sizes, crops = anima.prepare_pixels_standalone([info], True, False)
        got = preprocess.preprocess_image(info.absolute_path, info.bucket_reso, alpha=True)
        x = torch.from_numpy(got.pixels).permute(2, 0, 1).contiguous().float().div_(255).sub_(0.5).div_(0.5)
        assert torch.equal(x, pixels[0])
        np.testing.assert_array_equal(got.alpha_mask, masks[0].numpy())
        assert got.original_size == sizes[0] and got.crop_ltrb == crops[0]


def test_rgb_image_with_alpha_gets_a_mask_of_ones() -> None:
    img = np.zeros((80, 80, 3), np.uint8)
    got = preprocess.preprocess_image(img, (64, 64), alpha=True)
    assert got.alpha_mask is not None
    np.testing.assert_array_equal(got.alpha_mask, np.ones((64, 64), np.float32))


def test_random_crop_uses_the_random_module_like_sd_scripts() -> None:
    img = np.arange(100 * 300 * 3, dtype=np.uint32).reshape(100, 300, 3).astype(np.uint8)
    random.seed(5)
    a = preprocess.preprocess_image(img, (64, 64), random_crop=True, resized_size=(192, 64))
    random.seed(5)
    x = random.randint(0, 192 - 64)
    np.testing.assert_array_equal(a.pixels, preprocess.resize_image(img, (192, 64))[:, x : x + 64])
    assert a.crop_ltrb == preprocess.crop_ltrb((64, 64), (300, 100))


@needs_cv2
def test_named_interpolations_pick_sd_scripts_filters() -> None:
    import cv2

    img = np.random.default_rng(3).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    up = (100, 80)
    np.testing.assert_array_equal(
        preprocess.resize_image(img, up, "area"), cv2.resize(img, up, interpolation=cv2.INTER_AREA)
    )
    np.testing.assert_array_equal(
        preprocess.resize_image(img, up, "bilinear"), cv2.resize(img, up, interpolation=cv2.INTER_LINEAR)
    )
    box = np.asarray(PIL_Image.fromarray(img).resize(up, PIL_Image.Resampling.BOX))
    np.testing.assert_array_equal(preprocess.resize_image(img, up, "box"), box)
    got = preprocess.preprocess_image(img, (48, 32), interpolation="nearest")
    want = cv2.resize(
        img, preprocess.resized_size_for((50, 40), (48, 32)), interpolation=cv2.INTER_NEAREST_EXACT
    )
    x, y = (want.shape[1] - 48) // 2, (want.shape[0] - 32) // 2
    np.testing.assert_array_equal(got.pixels, want[y : y + 32, x : x + 48])
    with pytest.raises(ValueError, match="unknown resize interpolation"):
        preprocess.resize_image(img, up, "sinc")


def test_a_size_that_cannot_cover_the_bucket_is_an_error() -> None:
    with pytest.raises(ValueError, match="does not cover"):
        preprocess.preprocess_image(np.zeros((50, 50, 3), np.uint8), (64, 64), resized_size=(60, 60))


def _sd_scripts_functions() -> dict[str, Any]:
    """sd-scripts' own preprocessing functions, from ``SD_SCRIPTS_DIR``.

    ``library.train_util`` is imported when its requirements are installed; otherwise the functions are
    taken from its source by name (``ast``) and run with numpy, PIL, OpenCV and ``random``, so this check
    needs only an sd-scripts checkout.
    """
    sd = os.environ["SD_SCRIPTS_DIR"]
    sys.path.insert(0, sd)
    try:
        from library import train_util, utils  # type: ignore[import-not-found]

        return {
            "resize_image": utils.resize_image,
            "load_image": train_util.load_image,
            "trim_and_resize_if_required": train_util.trim_and_resize_if_required,
            "BucketManager": train_util.BucketManager,
        }
    except ImportError:
        pass
    finally:
        sys.path.remove(sd)
    import logging

    import cv2
    from PIL import Image

    ns: dict[str, Any] = {
        "np": np, "cv2": cv2, "Image": Image, "random": random, "math": math,
        "logger": logging.getLogger("sd"), "Optional": Any, "Tuple": tuple, "List": list, "Union": Any,
    }  # fmt: skip
    wanted = {
        "utils.py": ["get_cv2_interpolation", "get_pil_interpolation", "pil_resize", "resize_image"],
        "train_util.py": ["load_image", "trim_and_resize_if_required", "BucketManager"],
    }
    for fname, names in wanted.items():
        tree = ast.parse(Path(sd, "library", fname).read_text(encoding="utf-8"))
        nodes = [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef) and n.name in names]
        assert {n.name for n in nodes} == set(names), f"{fname}: not all of {names} found"
        exec(compile(ast.Module(body=nodes, type_ignores=[]), fname, "exec"), ns)  # noqa: S102
    return ns


@pytest.mark.sd_scripts
@needs_cv2
def test_preprocess_is_bit_equal_to_sd_scripts(tmp_path: Path) -> None:
    sd = _sd_scripts_functions()
    bm = sd["BucketManager"](False, (128, 128), 32, 256, 32)
    resos = [(128, 128), (160, 96), (96, 160), (192, 64), (64, 192), (128, 96), (96, 128)]
    bm.set_predefined_resos(resos)
    rng = np.random.default_rng(0)
    for i in range(40):
        w, h = int(rng.integers(40, 400)), int(rng.integers(40, 400))
        alpha = i % 4 == 0
        p = write_image(tmp_path / f"s{i}.{'png' if alpha or i % 2 else 'jpg'}", w, h, seed=i, alpha=alpha)
        bucket, resized, _ = bm.select_bucket(w, h)
        assert preprocess.resized_size_for((w, h), bucket) == tuple(resized)
        img = sd["load_image"](str(p), alpha)
        np.testing.assert_array_equal(preprocess.load_image(str(p), alpha), img)
        want, original, crop = sd["trim_and_resize_if_required"](False, img, bucket, resized)
        got = preprocess.preprocess_image(str(p), bucket, alpha=alpha)
        np.testing.assert_array_equal(got.pixels, want[:, :, :3])
        assert got.original_size == tuple(original) and got.crop_ltrb == tuple(crop)
        if alpha:
            np.testing.assert_array_equal(got.alpha_mask, want[:, :, 3].astype(np.float32) / 255.0)
        random.seed(i)
        want_r, _, _ = sd["trim_and_resize_if_required"](True, img, bucket, resized)
        random.seed(i)
        got_r = preprocess.preprocess_image(str(p), bucket, alpha=alpha, random_crop=True)
        np.testing.assert_array_equal(got_r.pixels, want_r[:, :, :3])
        interp = preprocess.INTERPOLATIONS[i % len(preprocess.INTERPOLATIONS)]
        want_i, _, _ = sd["trim_and_resize_if_required"](False, img, bucket, resized, interp)
        got_i = preprocess.preprocess_image(str(p), bucket, alpha=alpha, interpolation=interp)
        np.testing.assert_array_equal(got_i.pixels, want_i[:, :, :3], err_msg=interp)
    img = np.random.default_rng(7).integers(0, 256, (90, 70, 4), dtype=np.uint8)
    for interp in (None, *preprocess.INTERPOLATIONS):
        for size in ((35, 45), (140, 180), (60, 120)):
            want = sd["resize_image"](img, 70, 90, size[0], size[1], interp)
            np.testing.assert_array_equal(
                preprocess.resize_image(img, size, interp), want, err_msg=str(interp)
            )


# -- the pipeline against the serial reference ----------------------------------------------------------


def test_pipeline_caches_equal_the_serial_reference_bit_for_bit(tmp_path: Path, encoder: Any) -> None:
    src = tmp_path / "src"
    ref = tmp_path / "ref"
    src.mkdir()
    ref.mkdir()
    items = dataset(src, 14, flip=True)
    alpha_dir = tmp_path / "alpha"
    alpha_dir.mkdir()
    items += dataset(alpha_dir, 4, flip=True, alpha=True)
    enc = PerImage(encoder)
    summary = encode_items(items, enc, batch_size=3, decode_workers=2, progress=False)
    assert (summary.encoded, summary.failed, summary.skipped, summary.total) == (len(items), 0, 0, len(items))
    assert not summary.interrupted and summary.batches >= math.ceil(len(items) / 3)
    want = reference(items, encoder, ref)
    for it in items:
        got, exp = arrays(it.cache_path), arrays(want[it.cache_path])
        assert sorted(got) == sorted(exp), it.cache_path
        for k in exp:
            assert got[k].dtype == exp[k].dtype and np.array_equal(got[k], exp[k]), (it.cache_path, k)
    assert set(all_valid(items)) == {"ok"}
    meta = lc.read_meta(items[0].cache_path)
    assert meta is not None
    assert meta["vae"] == encoder.fingerprint and meta["vae_dtype"] == "fp32"
    assert meta["source"] == lc.source_fingerprint(items[0].image_path)


def test_batched_pipeline_is_within_fp32_tolerance_of_the_reference(tmp_path: Path, encoder: Any) -> None:
    ref = tmp_path / "ref"
    ref.mkdir()
    items = dataset(tmp_path, 10, flip=True)
    summary = encode_items(items, encoder, batch_size=4, progress=False, durable=False)
    assert summary.encoded == 10
    want = reference(items, encoder, ref)
    for it in items:
        got, exp = arrays(it.cache_path), arrays(want[it.cache_path])
        for k in exp:
            np.testing.assert_allclose(got[k], exp[k], rtol=0, atol=1e-5, err_msg=f"{it.cache_path} {k}")


def test_batches_group_by_condition_and_fill_up(tmp_path: Path, encoder: Any) -> None:
    items = dataset(tmp_path, 12, buckets=((64, 64), (96, 64), (64, 96)))
    enc = PerImage(encoder)
    s = encode_items(items, enc, batch_size=4, progress=False, durable=False)
    assert s.encoded == 12 and sorted(enc.calls) == [4, 4, 4]


def test_sink_gets_every_image_and_nothing_is_written(tmp_path: Path, encoder: Any) -> None:
    items = dataset(tmp_path, 6, flip=True, alpha=True)
    got: list[EncodedImage] = []
    lock = threading.Lock()

    def sink(e: EncodedImage) -> None:
        with lock:
            got.append(e)

    keyed = [
        EncodeItem(it.image_path, it.cache_path, it.bucket, it.flip, it.alpha, key=i)
        for i, it in enumerate(items)
    ]
    s = encode_items(keyed, encoder, batch_size=2, sink=sink, progress=False)
    assert s.encoded == 6 and len(got) == 6
    assert sorted(e.item.key for e in got) == list(range(6))  # type: ignore[type-var]
    assert not any(os.path.exists(it.cache_path) for it in items)
    for e in got:
        bw, bh = e.item.bucket
        assert e.latents.shape == (16, bh // 8, bw // 8) and e.latents.dtype == np.float32
        assert (e.latents_flipped is not None) == e.item.flip
        assert e.alpha_mask is not None and e.alpha_mask.shape == (bh, bw)
        assert e.latents.base is None or e.latents.base.size == e.latents.size  # its own copy


# -- robustness -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("error", [None, "cuda"])
def test_out_of_memory_halves_the_batch_and_encodes_everything(
    tmp_path: Path, encoder: Any, error: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    items = dataset(tmp_path, 9, flip=True, buckets=((64, 64),))
    enc = OomAbove(encoder, 2, torch.cuda.OutOfMemoryError if error else None)
    s = encode_items(items, enc, batch_size=8, progress=False, durable=False)
    assert (s.encoded, s.failed) == (9, 0)
    assert s.oom_retries >= 2  # the flip split, then halvings
    assert max(enc.calls) <= 2
    assert set(all_valid(items)) == {"ok"}
    assert any("out of memory" in r.getMessage() for r in caplog.records)


def test_library_allocation_failures_count_as_out_of_memory() -> None:
    assert pipeline.is_oom_error(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert pipeline.is_oom_error(
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate`")
    )
    assert pipeline.is_oom_error(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    assert not pipeline.is_oom_error(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not pipeline.is_oom_error(ValueError("out of memory"))


def test_out_of_memory_with_a_single_image_is_fatal(tmp_path: Path, encoder: Any) -> None:
    items = dataset(tmp_path, 2, buckets=((64, 64),))
    with pytest.raises(RuntimeError, match="single 64x64 image"):
        encode_items(items, OomAbove(encoder, 0), batch_size=2, progress=False)


def test_other_encoder_errors_propagate(tmp_path: Path, encoder: Any) -> None:
    items = dataset(tmp_path, 2)

    class Broken(PerImage):
        def __call__(self, x: Any) -> Any:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        encode_items(items, Broken(encoder), progress=False)


def test_corrupt_and_missing_images_are_reported_and_skipped(tmp_path: Path, encoder: Any) -> None:
    items = dataset(tmp_path, 5)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(b"\xff\xd8\xff\xe0")
    gone = tmp_path / "gone.png"
    extra = [EncodeItem(str(p), lc.cache_path(str(p), (64, 64)), (64, 64)) for p in (bad, trunc, gone)]
    s = encode_items(items + extra, encoder, batch_size=2, progress=False)
    assert (s.encoded, s.failed, s.total) == (5, 3, 8)
    assert sorted(p for p, _ in s.failures) == sorted(str(p) for p in (bad, trunc, gone))
    assert all("cannot read the image" in m for _, m in s.failures)
    assert not any(os.path.exists(e.cache_path) for e in extra)
    assert "failed: " + str(bad) in s.format()


def test_nan_latents_are_refused_and_counted(tmp_path: Path, encoder: Any) -> None:
    items = dataset(tmp_path, 4, buckets=((64, 64),))
    black = tmp_path / "black.png"
    PIL_Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(black)
    items.append(EncodeItem(str(black), lc.cache_path(str(black), (64, 64)), (64, 64)))

    class NanOnBlack(PerImage):
        def __call__(self, x: Any) -> Any:
            out = super().__call__(x)
            dark = x.flatten(1).max(dim=1).values <= -1
            out[dark] = float("nan")
            return out

    s = encode_items(items, NanOnBlack(encoder), batch_size=5, progress=False)
    assert (s.encoded, s.failed) == (4, 1)
    assert s.failures[0][0] == str(black) and "NaN" in s.failures[0][1]
    assert not black.with_name("black_0064x0064_anima.npz").exists()


def test_skip_existing_encodes_only_what_is_missing_or_stale(tmp_path: Path, encoder: Any) -> None:
    items = dataset(tmp_path, 6)
    assert encode_items(items, encoder, progress=False).encoded == 6
    s = encode_items(items, encoder, progress=False, skip_existing=True)
    assert (s.skipped, s.encoded) == (6, 0)
    os.remove(items[0].cache_path)
    Path(items[1].cache_path).write_bytes(b"PK\x03\x04broken")
    img = Path(items[2].image_path)
    write_image(img, *PIL_Image.open(img).size, seed=99)  # the image changed: stale
    with pytest.warns(lc.CorruptCacheWarning):
        s = encode_items(items, encoder, progress=False, skip_existing=True)
    assert (s.skipped, s.encoded) == (3, 3)
    assert set(all_valid(items)) == {"ok"}


def test_queues_never_exceed_their_bounds(tmp_path: Path, encoder: Any) -> None:
    items = dataset(tmp_path, 30, buckets=((64, 64), (96, 64), (64, 96)))
    s = encode_items(
        items, encoder, batch_size=2, queue_depth=5, write_workers=1, progress=False, durable=False
    )
    assert s.encoded == 30
    assert s.bounds == {"decode": 5, "write": 4}
    assert 0 < s.peaks["decode"] <= 5 and 0 < s.peaks["write"] <= 4


def test_a_window_smaller_than_a_batch_still_encodes_everything(tmp_path: Path, encoder: Any) -> None:
    items = dataset(tmp_path, 7, buckets=((64, 64), (96, 64)))
    enc = PerImage(encoder)
    s = encode_items(items, enc, batch_size=8, queue_depth=3, progress=False, durable=False)
    assert s.encoded == 7 and max(enc.calls) <= 3 and s.peaks["decode"] <= 3


def test_signal_handlers_are_restored(tmp_path: Path, encoder: Any) -> None:
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    encode_items(dataset(tmp_path, 2), encoder, progress=False)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_progress_logs_lines_when_stderr_is_not_a_terminal(
    tmp_path: Path, encoder: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="latentcache.encode")
    s = encode_items(dataset(tmp_path, 4), PerImage(encoder), batch_size=1, log_every_s=0.01)
    lines = [r.getMessage() for r in caplog.records]
    assert any(" images (" in m and "decode:" in m and "vae:" in m and "write:" in m for m in lines)
    assert lines[-1] == s.format() and "4 encoded" in lines[-1] and "VAE busy" in lines[-1]


def test_summary_dict_and_text() -> None:
    s = pipeline.EncodeSummary(total=10, encoded=6, skipped=2, failed=1, failures=[("a.png", "bad")],
                               wall_s=2.0, vae_s=1.5, batches=3, interrupted=True)  # fmt: skip
    d = s.as_dict()
    json.dumps(d)
    assert d["vae_busy"] == 0.75 and d["images_per_s"] == 3.0 and d["missing"] == 1
    text = s.format()
    assert "6 encoded, 2 skipped (valid), 1 failed of 10" in text and "VAE busy 75%" in text
    assert "interrupted: 1 images not encoded" in text and "failed: a.png: bad" in text


def test_owner_rank_is_the_drop_in_s() -> None:
    from latentcache import sd_scripts

    for i in range(200):
        path = f"/data/set{i % 7}/img_{i}_0512x0768_anima.npz"
        for world in (1, 2, 3, 8):
            assert distributed.owner_rank(path, world) == sd_scripts.owner_rank(path, world)


def test_distributed_true_without_a_process_group_is_an_error(tmp_path: Path, encoder: Any) -> None:
    with pytest.raises(RuntimeError, match="process group"):
        encode_items(dataset(tmp_path, 1), encoder, distributed=True, progress=False)


def test_a_bucket_off_the_stride_is_rejected(tmp_path: Path, encoder: Any) -> None:
    with pytest.raises(ValueError, match="stride"):
        encode_items([EncodeItem("a.png", "a_0064x0064_anima.npz", (60, 64))], encoder, progress=False)


# -- interruption ---------------------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import json, sys, time
    import torch
    from diffusers import AutoencoderKLQwenImage
    from latentcache.encode.encoders import build_encoder
    from latentcache.encode.pipeline import EncodeItem, encode_items

    items = [EncodeItem(*row[:3], flip=row[3]) for row in json.load(open(sys.argv[1]))]
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1).eval()
    enc = build_encoder(vae, "anima")

    class Slow:
        def __init__(self, enc):
            self.enc = enc
            for a in ("device", "dtype", "fingerprint", "channels", "stride"):
                setattr(self, a, getattr(enc, a))

        def __call__(self, x):
            time.sleep(0.15)
            return self.enc(x)

    print("started", flush=True)
    s = encode_items(items, Slow(enc), batch_size=2, progress=False, skip_existing=True)
    print("SUMMARY " + json.dumps(s.as_dict()), flush=True)
    """
)


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "SIGKILL"])
def test_interrupted_run_leaves_whole_caches_and_a_rerun_encodes_only_the_rest(
    tmp_path: Path, encoder: Any, how: str
) -> None:
    items = dataset(tmp_path, 24, flip=True)
    spec = tmp_path / "items.json"
    spec.write_text(json.dumps([[it.image_path, it.cache_path, list(it.bucket), it.flip] for it in items]))
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(spec)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if sum(os.path.exists(it.cache_path) for it in items) >= 4:
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(getattr(signal, how))
    out, err = proc.communicate(timeout=120)
    codes = all_valid(items)
    # Every cache is complete or absent; temporary files of a killed writer are not caches.
    assert set(codes) <= {"ok", "missing"}, codes
    done = codes.count("ok")
    assert 4 <= done < len(items)
    if how != "SIGKILL":
        assert proc.returncode == 0, err
        summary = json.loads(out.split("SUMMARY ", 1)[1])
        assert (
            summary["interrupted"] and summary["encoded"] == done and summary["missing"] == len(items) - done
        )
    else:
        assert proc.returncode == -signal.SIGKILL
    s = encode_items(items, encoder, progress=False, skip_existing=True)
    assert (s.skipped, s.encoded, s.failed) == (done, len(items) - done, 0)
    assert set(all_valid(items)) == {"ok"}


# -- the CUDA path's pieces, on the CPU -------------------------------------------------------------------


def test_unit_range_lut_is_torchvision_arithmetic_in_every_dtype() -> None:
    v = torch.arange(256, dtype=torch.float32)
    want = v.div(255.0).sub(0.5).div(0.5)  # ToTensor + Normalize([0.5], [0.5]), as sd-scripts runs them
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        lut = pipeline.unit_range_lut(dtype)
        assert lut.dtype == dtype and torch.equal(lut, want.to(dtype)), dtype
    # Why a table: the reciprocal multiplication CUDA uses for a division by a scalar is off by an ulp.
    recip = v * (torch.tensor(1.0) / 255.0)
    assert not torch.equal(recip, v / 255.0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_to_unit_range_equals_the_cpu_normalisation_bit_for_bit(dtype: str) -> None:
    dt = getattr(torch, dtype)
    u8 = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 16, 24, 3), dtype=np.uint8))
    got = pipeline.to_unit_range(u8, pipeline.unit_range_lut(dt))
    want = u8.permute(0, 3, 1, 2).contiguous().to(torch.float32).div(255).sub_(0.5).div_(0.5).to(dt)
    assert got.shape == (3, 3, 16, 24) and got.is_contiguous() and got.dtype == dt
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="uint8"):
        pipeline.to_unit_range(u8.float(), pipeline.unit_range_lut(dt))


class _LandingEvent:
    """Stands in for the CUDA event of a copy back: the pinned buffer holds its values only once
    ``synchronize()`` returned (until then it holds NaN, as an unfinished copy would hold garbage)."""

    def __init__(self, buffers: list[Any], values: list[Any]) -> None:
        self.buffers, self.values, self.synced = buffers, values, False

    def synchronize(self) -> None:
        for b, v in zip(self.buffers, self.values, strict=True):
            b.copy_(v)
        self.synced = True


def test_the_writer_reads_the_copied_back_latents_only_after_the_event() -> None:
    want = torch.randn(2, 16, 4, 4).to(torch.bfloat16)
    want_f = torch.randn(2, 16, 4, 4).to(torch.bfloat16)
    lat = torch.full_like(want, float("nan"))
    lat_f = torch.full_like(want_f, float("nan"))
    event = _LandingEvent([lat, lat_f], [want, want_f])
    written: list[tuple[Any, np.ndarray, np.ndarray | None]] = []
    released: list[int] = []
    holder = SimpleNamespace(
        _write_one=lambda d, a, b: written.append((d, a.copy(), None if b is None else b.copy())),
        _release_write=released.append,
        _fail=lambda *a: pytest.fail(f"unexpected failure {a}"),
    )
    decoded = [SimpleNamespace(item=None), SimpleNamespace(item=None)]
    pipeline._Pipeline._write_batch(holder, pipeline._Batch(decoded, lat, lat_f, event))  # type: ignore[arg-type]
    assert event.synced and len(written) == 2 and sum(released) == 2
    for i, (_, a, b) in enumerate(written):
        assert a.dtype == np.float32 and np.array_equal(a, want[i].float().numpy())  # bf16 -> fp32 exact
        assert b is not None and np.array_equal(b, want_f[i].float().numpy())


def test_out_of_memory_frees_the_failed_attempt_before_retrying(tmp_path: Path, encoder: Any) -> None:
    import weakref

    items = dataset(tmp_path, 4, buckets=((64, 64),))
    failed: list[Any] = []
    alive_at_retry: list[bool] = []

    class Remembers(OomAbove):
        def __call__(self, x: Any) -> Any:
            if x.shape[0] > self.limit:
                failed.append(weakref.ref(x))
            elif failed:
                alive_at_retry.append(any(r() is not None for r in failed))
            return super().__call__(x)

    s = encode_items(items, Remembers(encoder, 2), batch_size=4, progress=False, durable=False)
    assert (s.encoded, s.oom_retries) == (4, 1) and alive_at_retry and not any(alive_at_retry)


# -- GPU (skipped without CUDA) ----------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class SlowDevice(PerImage):
    """Queues a long device-side sleep before each forward: the host runs far ahead of the GPU, so a
    missing event wait, a copy read too early or a pinned buffer reused while its copy is in flight gives
    wrong latents instead of passing by luck."""

    def __call__(self, x: Any) -> Any:
        torch.cuda._sleep(50_000_000)  # about 25-50 ms of GPU time, none of host time
        return super().__call__(x)


def synchronous(items: list[EncodeItem], enc: Any) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """The same encoder, one image at a time and fully synchronous: pixels normalised on the CPU with
    torchvision's arithmetic, a pageable blocking upload, a blocking ``.cpu()``."""
    out = {}
    for it in items:
        pre = preprocess.preprocess_image(it.image_path, it.bucket)
        x = torch.from_numpy(pre.pixels).permute(2, 0, 1).unsqueeze(0).contiguous()
        x = x.to(torch.float32).div(255).sub_(0.5).div_(0.5).to(enc.device, enc.dtype)
        lat = enc(x).float().cpu().numpy()[0]
        lat_f = enc(x.flip(3)).float().cpu().numpy()[0] if it.flip else None
        out[it.cache_path] = (lat, lat_f)
    return out


def assert_equals_synchronous(items: list[EncodeItem], enc: Any, atol: float) -> None:
    want = synchronous(items, enc)
    for it in items:
        got_arrays = arrays(it.cache_path)
        h, w = it.bucket[1] // 8, it.bucket[0] // 8
        lat, lat_f = want[it.cache_path]
        np.testing.assert_allclose(got_arrays[f"latents_{h}x{w}"], lat, rtol=0, atol=atol)
        if it.flip:
            np.testing.assert_allclose(got_arrays[f"latents_flipped_{h}x{w}"], lat_f, rtol=0, atol=atol)


@pytest.mark.gpu
@gpu
def test_gpu_upload_is_pinned_and_non_blocking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from latentcache.encode.encoders import build_encoder

    enc = build_encoder(make_vae().to("cuda"), "anima")
    uploads: list[tuple[bool, bool]] = []
    copies_back: list[tuple[bool, bool]] = []
    real_to, real_copy = torch.Tensor.to, torch.Tensor.copy_

    def spy_to(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.device.type == "cpu" and self.dtype == torch.uint8:
            uploads.append((self.is_pinned(), bool(kwargs.get("non_blocking", False))))
        return real_to(self, *args, **kwargs)

    def spy_copy(self: Any, src: Any, non_blocking: bool = False) -> Any:
        if self.device.type == "cpu" and src.device.type == "cuda":
            copies_back.append((self.is_pinned(), bool(non_blocking)))
        return real_copy(self, src, non_blocking)

    monkeypatch.setattr(torch.Tensor, "to", spy_to)
    monkeypatch.setattr(torch.Tensor, "copy_", spy_copy)
    items = dataset(tmp_path, 6, flip=True)
    s = encode_items(items, enc, batch_size=3, progress=False)
    monkeypatch.undo()
    assert s.encoded == 6 and s.vae_s > 0
    assert uploads and all(p and nb for p, nb in uploads), uploads
    assert copies_back and all(p and nb for p, nb in copies_back), copies_back
    assert_equals_synchronous(items, enc, atol=1e-5)


@pytest.mark.gpu
@gpu
def test_gpu_pixels_on_the_device_are_bit_identical_to_the_cpu_normalisation() -> None:
    u8 = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 32, 48, 3), dtype=np.uint8))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        want = pipeline.to_unit_range(u8, pipeline.unit_range_lut(dtype))
        host = u8.pin_memory()
        lut = pipeline.unit_range_lut(dtype, "cuda")
        got = pipeline.to_unit_range(host.to("cuda", non_blocking=True), lut)
        assert got.is_cuda and torch.equal(got.cpu(), want), dtype


@pytest.mark.gpu
@gpu
def test_gpu_copy_back_lands_in_pinned_memory_after_its_event() -> None:
    for dtype in (torch.float32, torch.bfloat16):
        src = torch.randn(4, 16, 64, 64, device="cuda").to(dtype)
        torch.cuda._sleep(50_000_000)  # the copy queues behind it: unfinished unless the event is waited on
        got = pipeline.to_pinned(src)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream())
        event.synchronize()
        assert got.is_pinned() and got.dtype == dtype and torch.equal(got, src.cpu())


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("flip", [False, True])
def test_gpu_results_equal_the_synchronous_path_with_the_host_far_ahead(tmp_path: Path, flip: bool) -> None:
    from latentcache.encode.encoders import build_encoder

    enc = build_encoder(make_vae().to("cuda"), "anima")
    items = dataset(tmp_path, 20, flip=flip, buckets=((64, 64), (96, 64)))
    s = encode_items(items, SlowDevice(enc), batch_size=2, write_workers=3, progress=False, durable=False)
    assert (s.encoded, s.failed) == (20, 0)
    assert_equals_synchronous(items, enc, atol=1e-5)


@pytest.mark.gpu
@gpu
def test_gpu_bf16_run_and_memory_caching(tmp_path: Path) -> None:
    from latentcache.encode.encoders import build_encoder

    enc = build_encoder(make_vae().to("cuda", torch.bfloat16), "anima")
    got: list[EncodedImage] = []
    lock = threading.Lock()

    def sink(e: EncodedImage) -> None:
        with lock:
            got.append(e)

    items = dataset(tmp_path, 5, flip=True)
    s = encode_items(items, SlowDevice(enc), batch_size=2, sink=sink, progress=False)
    assert s.encoded == 5 and all(e.latents.dtype == np.float32 for e in got)
    want = synchronous(items, enc)
    for e in got:
        lat, lat_f = want[e.item.cache_path]
        np.testing.assert_allclose(e.latents, lat, rtol=0, atol=3e-2)
        assert e.latents_flipped is not None and lat_f is not None
        np.testing.assert_allclose(e.latents_flipped, lat_f, rtol=0, atol=3e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_gpu_encoder_on_a_device_other_than_the_current_one(tmp_path: Path) -> None:
    from latentcache.encode.encoders import build_encoder

    torch.cuda.set_device(0)
    enc = build_encoder(make_vae().to("cuda:1"), "anima")
    items = dataset(tmp_path, 8, flip=True)
    s = encode_items(items, SlowDevice(enc), batch_size=2, progress=False, durable=False)
    assert s.encoded == 8 and torch.cuda.current_device() == 0
    with torch.cuda.device(1):
        assert_equals_synchronous(items, enc, atol=1e-5)
