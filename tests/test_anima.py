"""The Anima strategy against sd-scripts-cache.md §8, install() with fake sd-scripts objects, and `run`.

Nothing here needs sd-scripts: the strategy runs standalone, and install() is exercised against a small
fake ``library`` package written into a temporary folder (each such test runs in a subprocess or
cleans the modules up, so the standalone class stays standalone for the other tests).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import latentcache as lc
import numpy as np
import pytest
from latentcache import anima
from latentcache.anima import StandaloneAnimaLatentsCachingStrategy as Standalone
from latentcache.integrations.sd_scripts import strategy as strategy_module
from npzgen import arrays_for, write_stock

torch = pytest.importorskip("torch")
PIL_Image = pytest.importorskip("PIL.Image")

PY = sys.executable


def png(path: Path, w: int, h: int, *, seed: int = 0, alpha: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 4 if alpha else 3), dtype=np.uint8)
    PIL_Image.fromarray(arr, "RGBA" if alpha else "RGB").save(path)
    return path


def cached(path: Path, bucket: tuple[int, int], **kw: bool) -> Path:
    return write_stock(path, arrays_for(bucket, **kw))


def anima_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("latentcache") and r.levelno >= 30]


# -- §8.1 / §8.2: class, constructor, properties, names -------------------------------------------


def test_without_sd_scripts_the_class_is_standalone() -> None:
    if anima.sd_scripts_available():
        pytest.skip("sd-scripts' library is importable here")
    assert anima.AnimaLatentsCachingStrategy is Standalone


def test_constructor_is_positional_and_keeps_the_properties() -> None:
    s = anima.AnimaLatentsCachingStrategy(True, 4, False)
    assert (s.cache_to_disk, s.batch_size, s.skip_disk_cache_validity_check) == (True, 4, False)
    s = anima.AnimaLatentsCachingStrategy(False, 1, True)
    assert (s.cache_to_disk, s.batch_size, s.skip_disk_cache_validity_check) == (False, 1, True)
    assert s.cache_suffix == "_anima.npz"
    assert s.ANIMA_LATENTS_NPZ_SUFFIX == "_anima.npz"


def test_importing_latentcache_imports_neither_torch_nor_sd_scripts() -> None:
    code = "import sys, latentcache, latentcache.anima, latentcache.sd_scripts, latentcache.cli\n"
    code += "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('library')))"
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "[]"


def test_npz_path_is_sd_scripts_name_and_idempotent(tmp_path: Path) -> None:
    s = Standalone(True, 1, False)
    img = str(tmp_path / "a.png")
    first = s.get_latents_npz_path(img, (602, 429))
    assert first == str(tmp_path / "a_0602x0429_anima.npz")
    assert s.get_latents_npz_path(first, (602, 429)) == first  # the #2362 guard
    assert s.get_latents_npz_path(img, [np.int64(64), np.int64(48)]) == str(
        tmp_path / "a_0064x0048_anima.npz"
    )
    assert s.get_latents_npz_path(str(tmp_path / "big.jpg"), (12345, 7)) == str(
        tmp_path / "big_12345x0007_anima.npz"
    )


def test_image_size_trusts_a_cache_name_with_exactly_the_image_stem(tmp_path: Path) -> None:
    s = Standalone(True, 1, False)
    # No image on disk at all: an exact-stem name is trusted as sd-scripts does.
    got = s.get_image_size_from_disk_cache_path(
        str(tmp_path / "cat.png"), str(tmp_path / "cat_0640x0480_anima.npz")
    )
    assert got == (640, 480) and all(type(v) is int for v in got)
    # FineTuningDataset passes the cache file itself as the image path.
    npz = str(tmp_path / "cat_0640x0480_anima.npz")
    assert s.get_image_size_from_disk_cache_path(npz, npz) == (640, 480)


@pytest.mark.parametrize(
    ("image", "foreign"),
    [
        ("cat", "cat_and_dog_0640x0480_anima.npz"),
        ("1234", "12345_0768x1024_anima.npz"),
        ("img1", "img10_0768x1024_anima.npz"),
        ("a", "a_0602x0429_anima_0602x0429_anima.npz"),  # a doubled-name leftover of #2362
        ("my", "my_anima.npz"),  # unparseable
    ],
)
def test_image_size_of_a_foreign_cache_comes_from_the_image_header(
    tmp_path: Path, image: str, foreign: str
) -> None:
    s = Standalone(True, 1, False)
    img = png(tmp_path / f"{image}.png", 40, 24)
    got = s.get_image_size_from_disk_cache_path(str(img), str(tmp_path / foreign))
    assert got == (40, 24) and all(type(v) is int for v in got)


def test_image_size_of_an_unparseable_name_handed_as_the_image(tmp_path: Path) -> None:
    # FineTuningDataset at 48d368fa: abs_path = npz_path = "my_anima.npz" for the key "my.png".
    s = Standalone(True, 1, False)
    png(tmp_path / "my.png", 32, 56)
    npz = str(tmp_path / "my_anima.npz")
    assert s.get_image_size_from_disk_cache_path(npz, npz) == (32, 56)


def test_image_size_with_nothing_readable_raises_naming_the_cache(tmp_path: Path) -> None:
    s = Standalone(True, 1, False)
    npz = str(tmp_path / "ghost_anima.npz")
    with pytest.raises(lc.CachePathError, match="ghost_anima.npz"):
        s.get_image_size_from_disk_cache_path(npz, npz)


# -- §8.5: validity --------------------------------------------------------------------------------


def test_valid_cache_is_expected(tmp_path: Path) -> None:
    s = Standalone(True, 1, False)
    f = cached(tmp_path / "a_0064x0048_anima.npz", (64, 48), flip=True, alpha=True)
    assert s.is_disk_cached_latents_expected((64, 48), str(f), True, True)
    assert not s.is_disk_cached_latents_expected((48, 64), str(f), False, False)  # other bucket
    assert not Standalone(False, 1, False).is_disk_cached_latents_expected((64, 48), str(f), False, False)


@pytest.mark.parametrize(
    "damage", ["truncated", "garbage", "empty", "flip_missing", "alpha_missing", "bad_shape"]
)
def test_bad_cache_is_false_with_one_warning_naming_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    s = Standalone(True, 1, False)
    f = tmp_path / "a_0064x0048_anima.npz"
    cached(f, (64, 48))
    flip = damage == "flip_missing"
    alpha = damage == "alpha_missing"
    if damage == "truncated":
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        f.write_bytes(b"not a zip file at all" * 10)
    elif damage == "empty":
        f.write_bytes(b"")
    elif damage == "bad_shape":
        arrs = arrays_for((64, 48))
        arrs["latents_6x8"] = np.zeros((16, 5, 8), np.float32)
        write_stock(f, arrs)
    caplog.set_level(logging.WARNING)
    assert s.is_disk_cached_latents_expected((64, 48), str(f), flip, alpha) is False
    msgs = anima_warnings(caplog)
    assert len(msgs) == 1 and str(f) in msgs[0]


def test_missing_cache_is_false_without_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    s = Standalone(True, 1, False)
    assert (
        s.is_disk_cached_latents_expected((64, 48), str(tmp_path / "a_0064x0048_anima.npz"), False, False)
        is False
    )
    assert anima_warnings(caplog) == []


def test_skip_validity_check_means_existence_only(tmp_path: Path) -> None:
    s = Standalone(True, 1, True)
    f = tmp_path / "a_0064x0048_anima.npz"
    assert not s.is_disk_cached_latents_expected((64, 48), str(f), False, False)
    f.write_bytes(b"garbage")
    assert s.is_disk_cached_latents_expected((64, 48), str(f), True, True)


def test_stale_cache_is_not_expected(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    s = Standalone(True, 1, False)
    img = png(tmp_path / "a.png", 64, 48, seed=1)
    npz = s.get_latents_npz_path(str(img), (64, 48))
    arrs = arrays_for((64, 48))
    s.save_latents_to_disk(npz, arrs["latents_6x8"], [64, 48], [0, 0, 64, 48], None, None, "_6x8")
    assert s.is_disk_cached_latents_expected((64, 48), npz, False, False)
    png(img, 64, 48, seed=2)  # edited in place, same size
    caplog.set_level(logging.WARNING)
    assert not s.is_disk_cached_latents_expected((64, 48), npz, False, False)
    assert any("stale" in m for m in anima_warnings(caplog))


# -- §8.3 / §8.4: load and save -------------------------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True])
def test_load_returns_sd_scripts_tuple_with_3d_float32(tmp_path: Path, legacy: bool) -> None:
    s = Standalone(True, 1, False)
    arrs = arrays_for((64, 48), flip=True, alpha=True, legacy=legacy)
    f = write_stock(tmp_path / "a_0064x0048_anima.npz", arrs)
    out = s.load_latents_from_disk(str(f), (64, 48))
    assert len(out) == 5
    lat, size, crop, flipped, alpha = out
    assert isinstance(size, list) and isinstance(crop, list)
    assert size == arrs["original_size_6x8"].tolist() and crop == arrs["crop_ltrb_6x8"].tolist()
    for got, key in ((lat, "latents_6x8"), (flipped, "latents_flipped_6x8")):
        assert got.shape == (16, 6, 8) and got.dtype == np.float32
        assert all(st >= 0 for st in got.strides)
        np.testing.assert_array_equal(got, arrs[key].reshape(16, 6, 8))
        assert torch.FloatTensor(got).shape == (16, 6, 8)  # what BaseDataset.__getitem__ does
    np.testing.assert_array_equal(alpha, arrs["alpha_mask_6x8"])
    f2 = write_stock(tmp_path / "b_0064x0048_anima.npz", arrays_for((64, 48)))
    assert s.load_latents_from_disk(str(f2), (64, 48))[3:] == (None, None)


def test_save_writes_np_load_readable_keys_and_the_source(tmp_path: Path) -> None:
    s = Standalone(True, 1, False)
    img = png(tmp_path / "a.png", 64, 48)
    npz = s.get_latents_npz_path(str(img), (64, 48))
    lat = torch.randn(16, 6, 8, dtype=torch.bfloat16)
    flip = torch.randn(16, 1, 6, 8)
    mask = torch.rand(48, 64)
    s.save_latents_to_disk(npz, lat, (64, 48), (0.0, 0.0, 64.0, 48.0), flip, mask, "_6x8")
    with np.load(npz) as z:
        assert {
            "latents_6x8",
            "latents_flipped_6x8",
            "alpha_mask_6x8",
            "original_size_6x8",
            "crop_ltrb_6x8",
        } <= set(z.files)
        assert z["latents_6x8"].dtype == np.float32 and z["latents_6x8"].shape == (16, 6, 8)
        np.testing.assert_array_equal(z["latents_6x8"], lat.float().numpy())
        assert z["latents_flipped_6x8"].shape == (16, 6, 8)
        assert z["original_size_6x8"].tolist() == [64, 48]
    assert lc.read_meta(npz)["source"] == lc.source_fingerprint(img)


def test_strategy_pickles_and_loads_in_a_spawned_worker(tmp_path: Path) -> None:
    s = Standalone(True, 3, True)
    t = pickle.loads(pickle.dumps(s))
    assert type(t) is Standalone and (t.cache_to_disk, t.batch_size, t.skip_disk_cache_validity_check) == (
        True,
        3,
        True,
    )
    f = cached(tmp_path / "a_0064x0048_anima.npz", (64, 48))
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        lat = pool.apply(s.load_latents_from_disk, (str(f), (64, 48)))[0]
    np.testing.assert_array_equal(lat, arrays_for((64, 48))["latents_6x8"])


# -- §8.7: encoding -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vae():  # type: ignore[no-untyped-def]
    diffusers = pytest.importorskip("diffusers")
    if not hasattr(diffusers, "AutoencoderKLQwenImage"):
        pytest.skip("this diffusers has no AutoencoderKLQwenImage")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLQwenImage(
        base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, attn_scales=[],
        temperal_downsample=[False, True, True],
    )  # fmt: skip
    return vae.eval()


def test_normalisation_constants_are_the_qwen_image_ones() -> None:
    from latentcache.encode.vae import LATENTS_MEAN, LATENTS_STD

    assert len(LATENTS_MEAN) == len(LATENTS_STD) == 16
    assert (LATENTS_MEAN[0], LATENTS_MEAN[7], LATENTS_MEAN[15]) == (-0.7571, 1.5508, -0.2921)
    assert (LATENTS_STD[0], LATENTS_STD[8], LATENTS_STD[15]) == (2.8184, 3.2687, 1.9160)


def cover(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int]:
    scale = max(bucket[0] / size[0], bucket[1] / size[1])
    return int(size[0] * scale + 0.5), int(size[1] * scale + 0.5)


def infos_for(tmp_path: Path, s: Standalone, specs: list[tuple[str, int, int]], alpha: bool = False) -> list:
    out = []
    for i, (name, w, h) in enumerate(specs):
        img = png(tmp_path / f"{name}.png", w, h, seed=i, alpha=alpha)
        info = SimpleNamespace(
            image_key=str(img), absolute_path=str(img), image=None, image_size=(w, h),
            bucket_reso=(64, 48), resized_size=cover((w, h), (64, 48)),
            latents_npz=s.get_latents_npz_path(str(img), (w, h)), latents=None, latents_flipped=None,
            alpha_mask=None, latents_original_size=None, latents_crop_ltrb=None,
        )  # fmt: skip
        out.append(info)
    return out


def reference_latents(vae, pixels):  # type: ignore[no-untyped-def]
    mean = torch.tensor([-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                         0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921])  # fmt: skip
    std = torch.tensor([2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                        3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160])  # fmt: skip
    with torch.no_grad():
        mu = vae.encode(pixels.unsqueeze(2)).latent_dist.mode()[:, :, 0]
    return (mu - mean.view(1, 16, 1, 1)) / std.view(1, 16, 1, 1)


def test_prepare_pixels_resizes_crops_and_scales(tmp_path: Path) -> None:
    s = Standalone(True, 1, False)
    infos = infos_for(tmp_path, s, [("a", 64, 48), ("b", 128, 80)], alpha=True)
    pixels, masks, sizes, crops = anima.prepare_pixels(infos, True, False)
    assert pixels.shape == (2, 3, 48, 64) and pixels.dtype == torch.float32
    assert float(pixels.min()) >= -1.0 and float(pixels.max()) <= 1.0
    raw = np.asarray(PIL_Image.open(infos[0].absolute_path))
    np.testing.assert_allclose(pixels[0].permute(1, 2, 0).numpy(), raw[:, :, :3] / 127.5 - 1.0, atol=1e-6)
    np.testing.assert_allclose(masks[0].numpy(), raw[:, :, 3] / 255.0, atol=1e-7)
    assert sizes == [(64, 48), (128, 80)]
    assert crops[0] == (0, 0, 64, 48)
    assert crops[1] == (0, 4.0, 64, 44.0)  # fitted inside the bucket, as sd-scripts' get_crop_ltrb


@pytest.mark.parametrize("to_disk", [False, True])
def test_cache_batch_latents_matches_a_direct_encode(tmp_path: Path, tiny_vae, to_disk: bool) -> None:  # type: ignore[no-untyped-def]
    s = Standalone(to_disk, 2, False)
    infos = infos_for(tmp_path, s, [("a", 64, 48), ("b", 96, 72)], alpha=True)
    pixels, masks, _, _ = anima.prepare_pixels(infos, True, False)
    want = reference_latents(tiny_vae, pixels)
    want_flipped = reference_latents(tiny_vae, torch.flip(pixels, dims=[3]))
    s.cache_batch_latents(tiny_vae, infos, True, True, False)
    for i, info in enumerate(infos):
        if to_disk:
            assert info.latents is None
            lat, size, crop, flipped, alpha = s.load_latents_from_disk(info.latents_npz, (64, 48))
            assert size == list(info.image_size)
            assert lc.read_meta(info.latents_npz)["source"] == lc.source_fingerprint(info.absolute_path)
        else:
            lat, flipped, alpha = info.latents, info.latents_flipped, info.alpha_mask
            assert isinstance(lat, torch.Tensor) and lat.device.type == "cpu"
            assert info.latents_original_size == info.image_size
            assert not os.path.exists(info.latents_npz)
        lat = torch.as_tensor(np.asarray(lat))
        assert lat.shape == (16, 6, 8)
        torch.testing.assert_close(lat, want[i], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            torch.as_tensor(np.asarray(flipped)), want_flipped[i], rtol=1e-5, atol=1e-5
        )
        np.testing.assert_allclose(np.asarray(alpha), masks[i].numpy())


def test_cache_batch_latents_rejects_nan(tmp_path: Path) -> None:
    class NanVae(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def encode_pixels_to_latents(self, x):  # type: ignore[no-untyped-def]
            return torch.full((x.shape[0], 16, x.shape[2] // 8, x.shape[3] // 8), float("nan"))

    s = Standalone(True, 1, False)
    infos = infos_for(tmp_path, s, [("a", 64, 48)])
    with pytest.raises(RuntimeError, match="a.png"):
        s.cache_batch_latents(NanVae(), infos, False, False, False)
    assert not os.path.exists(infos[0].latents_npz)


# -- install() with a fake sd-scripts -------------------------------------------------------------

FAKE_LIBRARY = {
    "__init__.py": "",
    "strategy_base.py": """
        class LatentsCachingStrategy:
            _strategy = None
            def __init__(self, cache_to_disk, batch_size, skip_disk_cache_validity_check):
                self._cache_to_disk = cache_to_disk
                self._batch_size = batch_size
                self.skip_disk_cache_validity_check = skip_disk_cache_validity_check
            @classmethod
            def set_strategy(cls, strategy):
                if cls._strategy is not None:
                    raise RuntimeError("already set")
                cls._strategy = strategy
            @classmethod
            def get_strategy(cls):
                return cls._strategy
            @property
            def cache_to_disk(self):
                return self._cache_to_disk
            @property
            def batch_size(self):
                return self._batch_size
    """,
    "strategy_anima.py": """
        from library.strategy_base import LatentsCachingStrategy
        class AnimaLatentsCachingStrategy(LatentsCachingStrategy):
            def __init__(self, cache_to_disk, batch_size, skip_disk_cache_validity_check):
                super().__init__(cache_to_disk, batch_size, skip_disk_cache_validity_check)
    """,
    "train_util.py": """
        import numpy as np
        from PIL import Image
        from library.strategy_base import LatentsCachingStrategy
        from latentcache.anima import prepare_pixels_standalone

        CALLS = {"original": 0, "loads": []}

        def load_image(path, alpha=False):
            CALLS["loads"].append(path)
            with Image.open(path) as im:
                return np.array(im.convert("RGBA" if alpha else "RGB"), np.uint8)

        def load_images_and_masks_for_caching(infos, use_alpha_mask, random_crop):
            return prepare_pixels_standalone(infos, use_alpha_mask, random_crop)

        class ImageInfo:
            def __init__(self, key, path, size):
                self.image_key, self.absolute_path, self.image_size = key, path, size
                self.num_repeats = 1
                self.latents_npz = self.latents = self.latents_flipped = self.alpha_mask = None
                self.latents_original_size = self.latents_crop_ltrb = self.image = None
                self.bucket_reso = self.resized_size = None

        class Subset:
            def __init__(self, image_dir, flip_aug=False, alpha_mask=False):
                self.image_dir, self.flip_aug, self.alpha_mask = image_dir, flip_aug, alpha_mask
                self.random_crop = False

        class BucketManager:
            # two buckets, landscape 64x48 and portrait 48x64
            def __init__(self):
                self.resos, self.buckets = [], []
            def select_bucket(self, w, h):
                reso = (64, 48) if w >= h else (48, 64)
                if reso not in self.resos:
                    self.resos.append(reso)
                    self.buckets.append([])
                return reso, reso, 0.0
            def add_image(self, reso, key):
                self.buckets[self.resos.index(reso)].append(key)

        class BaseDataset:
            batch_size = 1
            def __init__(self):
                self.image_data, self.image_to_subset = {}, {}
                self.bucket_manager = None
                self.make_buckets_calls = 0
            def add(self, info, subset):
                self.image_data[info.image_key] = info
                self.image_to_subset[info.image_key] = subset
            def get_image_size(self, path):
                with Image.open(path) as im:
                    return im.size
            def make_buckets(self):
                self.make_buckets_calls += 1
                if self.bucket_manager is None:
                    self.bucket_manager = BucketManager()
                for info in self.image_data.values():
                    if info.image_size is None:
                        info.image_size = self.get_image_size(info.absolute_path)
                    bucket = self.bucket_manager.select_bucket(*info.image_size)
                    info.bucket_reso, info.resized_size = bucket[0], bucket[1]
                for info in self.image_data.values():
                    self.bucket_manager.add_image(info.bucket_reso, info.image_key)
                self._length = sum(len(b) for b in self.bucket_manager.buckets if b)
            def __len__(self):
                return self._length
            def new_cache_latents(self, model, accelerator):
                CALLS["original"] += 1

        class DreamBoothDataset(BaseDataset):
            pass

        class DatasetGroup:
            def __init__(self, datasets):
                self.datasets = list(datasets)
                self.cumulative_sizes = []
                total = 0
                for d in self.datasets:
                    total += len(d)
                    self.cumulative_sizes.append(total)
            def new_cache_latents(self, model, accelerator):
                for d in self.datasets:
                    d.new_cache_latents(model, accelerator)
                accelerator.wait_for_everyone()
    """,
}


@pytest.fixture()
def fake_sd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    root = tmp_path / "sd"
    (root / "library").mkdir(parents=True)
    for name, text in FAKE_LIBRARY.items():
        (root / "library" / name).write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(root))
    yield root
    for name in [m for m in sys.modules if m == "library" or m.startswith("library.")]:
        del sys.modules[name]
    strategy_module.__dict__.pop("AnimaLatentsCachingStrategy", None)


class Accel:
    def __init__(self, n: int = 1, rank: int = 0) -> None:
        self.num_processes, self.process_index, self.barriers = n, rank, 0

    def wait_for_everyone(self) -> None:
        self.barriers += 1


class CountingVae(torch.nn.Module):
    """sd-scripts' interface (encode_pixels_to_latents); the latents are pooled pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))
        self.encoded: list[int] = []

    @property
    def device(self):  # type: ignore[no-untyped-def]
        return self.w.device

    @property
    def dtype(self):  # type: ignore[no-untyped-def]
        return self.w.dtype

    def encode_pixels_to_latents(self, x):  # type: ignore[no-untyped-def]
        self.encoded.append(x.shape[0])
        pooled = torch.nn.functional.avg_pool2d(x, 8)
        return pooled.repeat(1, 6, 1, 1)[:, :16] * self.w


def make_dataset(tu, folder: Path, specs, flip: bool = False):  # type: ignore[no-untyped-def]
    ds = tu.DreamBoothDataset()
    sub = tu.Subset(str(folder), flip_aug=flip)
    for name, size in specs:
        path = str(folder / name)
        ds.add(tu.ImageInfo(path, path, size), sub)
    ds.make_buckets()
    return ds


def set_strategy(skip: bool = False):  # type: ignore[no-untyped-def]
    import library.strategy_anima as sa
    from library.strategy_base import LatentsCachingStrategy

    s = sa.AnimaLatentsCachingStrategy(True, 2, skip)
    LatentsCachingStrategy.set_strategy(s)
    return s


def test_install_replaces_the_class_and_wraps_without_setting_the_strategy(fake_sd: Path) -> None:
    import library.strategy_anima as sa
    import library.train_util as tu
    from latentcache import sd_scripts
    from library.strategy_base import LatentsCachingStrategy

    original = sa.AnimaLatentsCachingStrategy
    sd_scripts.install()
    sd_scripts.install()  # idempotent
    assert sd_scripts.installed()
    assert sa.AnimaLatentsCachingStrategy is anima.AnimaLatentsCachingStrategy
    assert issubclass(sa.AnimaLatentsCachingStrategy, original)
    assert sa.AnimaLatentsCachingStrategy.__module__ == "latentcache.integrations.sd_scripts.strategy"
    assert LatentsCachingStrategy.get_strategy() is None
    assert tu.BaseDataset.new_cache_latents.__wrapped__.__name__ == "new_cache_latents"
    assert not hasattr(tu.BaseDataset.new_cache_latents.__wrapped__, "__wrapped__")
    s = sa.AnimaLatentsCachingStrategy(True, 2, False)
    t = pickle.loads(pickle.dumps(s))
    assert type(t) is type(s) and t.batch_size == 2
    # Without latentcache's strategy the original method runs.
    LatentsCachingStrategy.set_strategy(original(True, 1, False))
    tu.DatasetGroup([make_dataset(tu, fake_sd, [])]).new_cache_latents(None, Accel())
    assert tu.CALLS["original"] == 1


def test_first_run_encodes_second_run_reuses_and_barriers_per_dataset(fake_sd: Path, tmp_path: Path) -> None:
    from latentcache import sd_scripts

    sd_scripts.install()
    import library.train_util as tu

    d = tmp_path / "img"
    d.mkdir()
    for i, (n, w, h) in enumerate([("a", 64, 48), ("b", 48, 64), ("c", 128, 96)]):
        png(d / f"{n}.png", w, h, seed=i)
    specs = [("a.png", (64, 48)), ("b.png", (48, 64)), ("c.png", (128, 96))]
    set_strategy()
    vae = CountingVae()
    acc = Accel()
    tu.DatasetGroup([make_dataset(tu, d, specs), make_dataset(tu, d, specs, flip=True)]).new_cache_latents(
        vae, acc
    )
    assert acc.barriers == 2  # one after each dataset
    first = sum(vae.encoded)
    # 3 images; then, flip being new in the second dataset, 3 again and 3 flipped (as sd-scripts does)
    assert first == 9
    vae.encoded.clear()
    tu.CALLS["loads"].clear()
    tu.DatasetGroup([make_dataset(tu, d, specs), make_dataset(tu, d, specs, flip=True)]).new_cache_latents(
        vae, acc
    )
    assert vae.encoded == [] and tu.CALLS["loads"] == []
    assert lc.validate([str(d / "a_0064x0048_anima.npz")], (64, 48), flipped=True)[0].ok


def test_cache_file_as_image_path_is_mapped_back_by_key(fake_sd: Path, tmp_path: Path) -> None:
    from latentcache import sd_scripts

    sd_scripts.install()
    import library.train_util as tu

    d = tmp_path / "img"
    d.mkdir()
    png(d / "cat.png", 64, 48, seed=1)
    png(d / "cat_and_dog.png", 48, 64, seed=2)
    sibling = cached(d / "cat_and_dog_0048x0064_anima.npz", (48, 64))
    set_strategy()
    ds = tu.DreamBoothDataset()
    sub = tu.Subset(str(d))
    # What FineTuningDataset leaves: the sibling's cache as cat's path, with the sibling's size.
    info = tu.ImageInfo("cat.png", str(sibling), (48, 64))
    info.latents_npz = str(sibling)
    ds.add(info, sub)
    ds.make_buckets()
    assert info.bucket_reso == (48, 64)
    group = tu.DatasetGroup([ds])
    vae = CountingVae()
    group.new_cache_latents(vae, Accel())
    assert info.absolute_path == str(d / "cat.png")
    assert info.image_size == (64, 48) and info.bucket_reso == (64, 48)
    assert info.latents_npz == str(d / "cat_0064x0048_anima.npz")
    assert sum(vae.encoded) == 1 and ds.make_buckets_calls == 2
    assert ds.bucket_manager.buckets[ds.bucket_manager.resos.index((64, 48))] == ["cat.png"]
    assert group.cumulative_sizes == [1]
    # The sibling's cache is untouched.
    assert lc.read_meta(sibling) is None


def test_missing_image_error_names_cache_and_paths_tried(fake_sd: Path, tmp_path: Path) -> None:
    from latentcache import sd_scripts

    sd_scripts.install()
    import library.train_util as tu

    npz = cached(tmp_path / "gone_0064x0048_anima.npz", (64, 48))
    set_strategy()
    ds = tu.DreamBoothDataset()
    ds.add(tu.ImageInfo("gone.png", str(npz), (64, 48)), tu.Subset(str(tmp_path)))
    ds.make_buckets()
    with pytest.raises(sd_scripts.SourceImageNotFoundError) as e:
        tu.DatasetGroup([ds]).new_cache_latents(CountingVae(), Accel())
    assert str(npz) in str(e.value) and str(tmp_path / "gone.png") in str(e.value)
    assert str(tmp_path / "gone.webp") in e.value.tried
    assert pickle.loads(pickle.dumps(e.value)).tried == e.value.tried


def test_key_with_a_non_image_suffix_never_resolves_to_a_sibling(fake_sd: Path, tmp_path: Path) -> None:
    from latentcache import sd_scripts

    sd_scripts.install()
    import library.train_util as tu

    png(tmp_path / "cat.png", 64, 48, seed=1)  # another image: `cat.v2` is not `cat`
    npz = cached(tmp_path / "cat.v2_0064x0048_anima.npz", (64, 48))
    set_strategy()
    ds = tu.DreamBoothDataset()
    ds.add(tu.ImageInfo("cat.v2", str(npz), (64, 48)), tu.Subset(str(tmp_path)))
    ds.make_buckets()
    with pytest.raises(sd_scripts.SourceImageNotFoundError) as e:
        tu.DatasetGroup([ds]).new_cache_latents(CountingVae(), Accel())
    assert str(tmp_path / "cat.png") not in e.value.tried
    assert str(tmp_path / "cat.v2.png") in e.value.tried


def test_images_sharing_a_stem_are_reported(
    fake_sd: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from latentcache import sd_scripts

    sd_scripts.install()
    import library.train_util as tu

    png(tmp_path / "cat.png", 64, 48, seed=1)
    png(tmp_path / "cat.jpg", 64, 48, seed=2)  # same stem, same size: one cache name for both
    set_strategy()
    ds = tu.DreamBoothDataset()
    for name in ("cat.png", "cat.jpg"):
        ds.add(tu.ImageInfo(name, str(tmp_path / name), (64, 48)), tu.Subset(str(tmp_path)))
    ds.make_buckets()
    with caplog.at_level("WARNING", logger="latentcache.sd_scripts"):
        tu.DatasetGroup([ds]).new_cache_latents(CountingVae(), Accel())
    shared = [r.getMessage() for r in caplog.records if "share one cache file" in r.getMessage()]
    assert len(shared) == 1 and "cat.png" in shared[0] and "cat.jpg" in shared[0]


def test_corrupt_and_missing_key_caches_are_reencoded(fake_sd: Path, tmp_path: Path) -> None:
    from latentcache import sd_scripts

    sd_scripts.install()
    import library.train_util as tu

    png(tmp_path / "a.png", 64, 48, seed=1)
    png(tmp_path / "b.png", 64, 48, seed=2)
    bad = tmp_path / "a_0064x0048_anima.npz"
    bad.write_bytes(b"PK\x03\x04 truncated")
    cached(tmp_path / "b_0064x0048_anima.npz", (64, 48))  # no flipped latents
    set_strategy()
    vae = CountingVae()
    ds = make_dataset(tu, tmp_path, [("a.png", (64, 48)), ("b.png", (64, 48))], flip=True)
    with pytest.warns(lc.CorruptCacheWarning):
        tu.DatasetGroup([ds]).new_cache_latents(vae, Accel())
    assert sum(vae.encoded) == 4
    assert all(
        s.ok for s in lc.validate([str(bad), str(tmp_path / "b_0064x0048_anima.npz")], (64, 48), flipped=True)
    )


def test_each_cache_file_is_written_by_one_rank(fake_sd: Path, tmp_path: Path) -> None:
    from latentcache import sd_scripts

    sd_scripts.install()
    import library.train_util as tu

    names = [f"{i:05d}" for i in range(24)]
    for i, n in enumerate(names):
        png(tmp_path / f"{n}.png", 64, 48, seed=i)
    specs = [(f"{n}.png", (64, 48)) for n in names]
    set_strategy()
    written: list[set[str]] = []
    for rank in range(2):
        before = {p.name for p in tmp_path.glob("*_anima.npz")}
        tu.DatasetGroup([make_dataset(tu, tmp_path, specs)]).new_cache_latents(CountingVae(), Accel(2, rank))
        written.append({p.name for p in tmp_path.glob("*_anima.npz")} - before)
    assert written[0] and written[1] and not (written[0] & written[1])
    assert len(written[0] | written[1]) == len(names)
    for rank, files in enumerate(written):
        for f in files:
            assert sd_scripts.owner_rank(str(tmp_path / f), 2) == rank
    # The owner is a property of the path, not of its position in the list.
    assert [sd_scripts.owner_rank(str(tmp_path / f"{n}_0064x0048_anima.npz"), 2) for n in names] != [
        i % 2 for i in range(len(names))
    ]


def test_memory_caching_goes_through_the_pipeline(fake_sd: Path, tmp_path: Path) -> None:
    from latentcache import sd_scripts

    sd_scripts.install()
    import library.strategy_anima as sa
    import library.train_util as tu
    from library.strategy_base import LatentsCachingStrategy

    specs = [("a.png", (64, 48)), ("b.png", (48, 64)), ("c.png", (128, 96))]
    for i, (name, (w, h)) in enumerate(specs):
        png(tmp_path / name, w, h, seed=i)
    LatentsCachingStrategy.set_strategy(sa.AnimaLatentsCachingStrategy(False, 2, False))
    vae = CountingVae()
    ds = make_dataset(tu, tmp_path, specs, flip=True)
    tu.DatasetGroup([ds]).new_cache_latents(vae, Accel())
    assert sum(vae.encoded) == 6  # 3 images and their flips
    for info in ds.image_data.values():
        w, h = info.bucket_reso
        assert isinstance(info.latents, torch.Tensor) and info.latents.device.type == "cpu"
        assert info.latents.shape == (16, h // 8, w // 8) and info.latents.dtype == torch.float32
        assert (
            isinstance(info.latents_flipped, torch.Tensor)
            and info.latents_flipped.shape == info.latents.shape
        )
        assert (
            tuple(info.latents_original_size) == tuple(info.image_size) and len(info.latents_crop_ltrb) == 4
        )
        assert info.alpha_mask is None
        # CountingVae's latents are the pooled pixels: the flipped ones are the mirror image.
        torch.testing.assert_close(info.latents_flipped, torch.flip(info.latents, dims=[2]), atol=0.1, rtol=0)
    assert not list(tmp_path.glob("*.npz"))


def test_the_drop_in_folds_a_qwen_vae_and_leaves_it_as_it_was(
    fake_sd: Path, tmp_path: Path, tiny_vae
) -> None:  # type: ignore[no-untyped-def]
    import inspect

    from latentcache import sd_scripts
    from latentcache.encode.encoders import vae_fingerprint

    sd_scripts.install()
    import library.train_util as tu

    specs = [("a.png", (64, 48)), ("b.png", (48, 64))]
    for i, (name, (w, h)) in enumerate(specs):
        png(tmp_path / name, w, h, seed=i)
    set_strategy()
    before = {k: v.clone() for k, v in tiny_vae.state_dict().items()}
    modules = [type(m) for m in tiny_vae.modules()]
    ds = make_dataset(tu, tmp_path, specs)
    tu.DatasetGroup([ds]).new_cache_latents(tiny_vae, Accel())
    after = tiny_vae.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [type(m) for m in tiny_vae.modules()] == modules
    fingerprint = vae_fingerprint(tiny_vae)
    for info in ds.image_data.values():
        assert lc.read_meta(info.latents_npz)["vae"] == fingerprint
        pixels, _, _, _ = anima.prepare_pixels([info], False, False)
        lat = lc.load(info.latents_npz, info.bucket_reso).latents
        torch.testing.assert_close(
            torch.from_numpy(lat), reference_latents(tiny_vae, pixels)[0], atol=1e-5, rtol=0
        )
    if "vae" not in inspect.signature(lc.validate).parameters:
        return
    # Another VAE: the caches are stale and made again.
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(1)
    other = diffusers.AutoencoderKLQwenImage(
        base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, attn_scales=[],
        temperal_downsample=[False, True, True],
    ).eval()  # fmt: skip
    tu.DatasetGroup([make_dataset(tu, tmp_path, specs)]).new_cache_latents(other, Accel())
    for info in ds.image_data.values():
        assert lc.read_meta(info.latents_npz)["vae"] == vae_fingerprint(other)


# -- the launcher ---------------------------------------------------------------------------------


def test_run_puts_the_script_folder_on_sys_path_and_installs(fake_sd: Path) -> None:
    script = fake_sd / "train.py"
    script.write_text(
        textwrap.dedent("""
        import sys
        import library.strategy_anima as sa
        print("ARGV", sys.argv[1:])
        print("CLASS", sa.AnimaLatentsCachingStrategy.__module__, sa.AnimaLatentsCachingStrategy.__name__)
        print("MAIN", __name__)
        sys.exit(3)
        """)
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for cmd in (
        [PY, "-m", "latentcache", "run"],
        [PY, "-c", "import sys; from latentcache.cli import main; sys.exit(main())", "run"],
    ):  # noqa: E501
        out = subprocess.run(
            [*cmd, str(script), "--flag", "x", "--help"], capture_output=True, text=True, cwd="/", env=env
        )
        assert out.returncode == 3, out.stderr
        assert "ARGV ['--flag', 'x', '--help']" in out.stdout
        assert "CLASS latentcache.integrations.sd_scripts.strategy AnimaLatentsCachingStrategy" in out.stdout
        assert "MAIN __main__" in out.stdout
    out = subprocess.run(
        [PY, "-m", "latentcache", "run", str(fake_sd / "nope.py")], capture_output=True, text=True
    )
    assert out.returncode == 2 and "nope.py" in out.stderr


def test_run_outside_an_sd_scripts_checkout_is_a_one_line_error(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text("print('must not run')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [PY, "-m", "latentcache", "run", str(script)], capture_output=True, text=True, cwd="/", env=env
    )
    assert out.returncode == 2 and "must not run" not in out.stdout
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "not an sd-scripts checkout" in out.stderr and str(tmp_path) in out.stderr
    out = subprocess.run([PY, "-m", "latentcache", "run"], capture_output=True, text=True)
    assert out.returncode == 2 and "training script is required" in out.stderr


def test_run_names_an_sd_scripts_import_failure(tmp_path: Path) -> None:
    (tmp_path / "library").mkdir()
    (tmp_path / "library" / "__init__.py").write_text("")
    (tmp_path / "library" / "strategy_anima.py").write_text("import latentcache_test_missing_dependency\n")
    script = tmp_path / "train.py"
    script.write_text("print('must not run')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [PY, "-m", "latentcache", "run", str(script)], capture_output=True, text=True, cwd="/", env=env
    )
    assert out.returncode == 2 and "must not run" not in out.stdout and "Traceback" not in out.stderr
    assert "library.strategy_anima could not be imported" in out.stderr
    assert "latentcache_test_missing_dependency" in out.stderr
