"""Bucket selection: the same bucket and resized size as sd-scripts' BucketManager.

The concrete cases were read off sd-scripts 48d368fa; the property tests compare with sd-scripts' own
``BucketManager`` and ``make_bucket_resolutions`` when ``SD_SCRIPTS_DIR`` is set (marker ``sd_scripts``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from latentcache.encode.buckets import (
    BucketManager,
    BucketSettings,
    make_bucket_resolutions,
    parse_resolution,
)

PREDEFINED_1024 = BucketSettings((1024, 1024), enable_bucket=True)
NO_UPSCALE_1024 = BucketSettings((1024, 1024), enable_bucket=True, bucket_no_upscale=True)
FIXED_512 = BucketSettings((512, 512))


def test_predefined_resolutions_are_sd_scripts_ones() -> None:
    resos = make_bucket_resolutions((1024, 1024), 256, 1024, 64)
    assert len(resos) == 25 and resos == sorted(resos)
    assert resos[0] == (256, 1024) and resos[12] == (1024, 256) and resos[-1] == (1024, 1024)
    assert (576, 1024) in resos and (1024, 576) in resos and (1344, 768) not in resos


@pytest.mark.parametrize(
    ("settings", "size", "bucket", "resized"),
    [
        (PREDEFINED_1024, (1024, 1024), (1024, 1024), (1024, 1024)),
        (PREDEFINED_1024, (1920, 1080), (1024, 576), (1024, 576)),
        (PREDEFINED_1024, (1080, 1920), (576, 1024), (576, 1024)),
        (PREDEFINED_1024, (800, 600), (1024, 768), (1024, 768)),
        (PREDEFINED_1024, (333, 777), (448, 1024), (448, 1045)),
        (PREDEFINED_1024, (4000, 1000), (1024, 256), (1024, 256)),
        (PREDEFINED_1024, (512, 512), (1024, 1024), (1024, 1024)),  # enlarged
        (PREDEFINED_1024, (832, 1216), (704, 1024), (704, 1029)),
        (NO_UPSCALE_1024, (1024, 1024), (1024, 1024), (1024, 1024)),
        (NO_UPSCALE_1024, (1920, 1080), (1344, 768), (1365, 768)),
        (NO_UPSCALE_1024, (300, 200), (256, 192), (300, 200)),  # never enlarged: cropped
        (NO_UPSCALE_1024, (2000, 3000), (832, 1216), (832, 1248)),
        (NO_UPSCALE_1024, (700, 100), (640, 64), (700, 100)),
        (FIXED_512, (1920, 1080), (512, 512), (910, 512)),
        (FIXED_512, (300, 200), (512, 512), (768, 512)),
        (FIXED_512, (512, 512), (512, 512), (512, 512)),
        (BucketSettings((256, 256), True, 32, 256, 16), (96, 64), (256, 176), (264, 176)),
        (BucketSettings((256, 256), True, 32, 256, 16), (64, 96), (176, 256), (176, 264)),
    ],
)
def test_concrete_cases_match_sd_scripts(
    settings: BucketSettings, size: tuple[int, int], bucket: tuple[int, int], resized: tuple[int, int]
) -> None:
    got = settings.select(*size)
    assert (got.reso, got.resized_size) == (bucket, resized)
    assert got.ar_error == pytest.approx(bucket[0] / bucket[1] - size[0] / size[1])


def test_an_image_whose_size_is_a_bucket_keeps_it() -> None:
    m = BucketManager(False, (1024, 1024), None, None, None)
    m.set_predefined_resos([(1024, 512), (1000, 500)])  # equal aspect ratios: the size decides
    assert m.select_bucket(1000, 500).reso == (1000, 500)
    assert m.select_bucket(2000, 1000).reso == (1024, 512)  # the first of equals


def test_min_max_are_rounded_to_the_step_and_checked() -> None:
    s = BucketSettings((512, 512), True, 250, 1000, 64).adjusted()
    assert (s.min_bucket_reso, s.max_bucket_reso) == (192, 1024)
    with pytest.raises(ValueError, match="min_bucket_reso"):
        BucketSettings((256, 256), True, 512, 1024, 64).adjusted()
    with pytest.raises(ValueError, match="max_bucket_reso"):
        BucketSettings((2048, 2048), True, 256, 1024, 64).adjusted()
    assert FIXED_512.adjusted() is FIXED_512  # min/max are ignored without bucketing


def test_parse_resolution() -> None:
    assert parse_resolution("1024") == (1024, 1024)
    assert parse_resolution("1024,768") == (1024, 768)
    assert parse_resolution(512) == (512, 512)
    assert parse_resolution([640, 480]) == (640, 480)
    for bad in ("", "a", "1,2,3", "0", "-5"):
        with pytest.raises(ValueError):
            parse_resolution(bad)


def test_bad_sizes_raise() -> None:
    with pytest.raises(ValueError):
        PREDEFINED_1024.select(0, 10)
    with pytest.raises(ValueError):
        BucketManager(False, (1024, 1024), None, None, None).select_bucket(10, 10)  # no buckets set


# -- against sd-scripts' own code ----------------------------------------------------------------


@pytest.fixture(scope="module")
def sd_buckets() -> Iterator[Any]:
    """sd-scripts' BucketManager and make_bucket_resolutions; sys.path and sys.modules restored after,
    so that later tests (which may expect no sd-scripts) do not see its ``library``."""
    sd_dir = os.environ.get("SD_SCRIPTS_DIR", "")
    saved_path = list(sys.path)
    saved_modules = set(sys.modules)
    sys.path.insert(0, sd_dir)
    try:
        try:
            from library import model_util, train_util
        except ImportError as e:  # the marker says sd-scripts is there; its requirements may not be
            pytest.skip(f"sd-scripts' library cannot be imported here: {e}")
        yield train_util.BucketManager, model_util.make_bucket_resolutions
    finally:
        sys.path[:] = saved_path
        for name in set(sys.modules) - saved_modules:
            if name == "library" or name.startswith("library."):
                del sys.modules[name]


def _sd_select(sd_buckets: Any, s: BucketSettings, w: int, h: int) -> Any:
    """What sd-scripts' BaseDataset.make_buckets picks, or the exception type it raises."""
    manager_cls, _ = sd_buckets
    s = s.adjusted()
    try:
        if s.enable_bucket:
            m = manager_cls(
                s.bucket_no_upscale, s.resolution, s.min_bucket_reso, s.max_bucket_reso, s.bucket_reso_steps
            )
            if not s.bucket_no_upscale:
                m.make_buckets()
        else:
            m = manager_cls(False, s.resolution, None, None, None)
            m.set_predefined_resos([s.resolution])
        reso, resized, err = m.select_bucket(w, h)
    except (ZeroDivisionError, AssertionError) as e:
        return type(e).__name__
    return tuple(reso), tuple(int(v) for v in resized), float(err)


def _ours(s: BucketSettings, w: int, h: int) -> Any:
    try:
        b = s.select(w, h)
    except ZeroDivisionError as e:
        return type(e).__name__
    except ValueError:
        return "AssertionError"
    return b.reso, b.resized_size, b.ar_error


steps_st = st.sampled_from([8, 16, 32, 64, 128])
settings_st = st.builds(
    lambda res, steps, lo, hi, no_up, enable: BucketSettings(
        res, enable, min(lo, min(res)), max(hi, max(res)), steps, no_up
    ),
    st.tuples(st.integers(64, 2048), st.integers(64, 2048)),
    steps_st,
    st.integers(32, 1024),
    st.integers(256, 4096),
    st.booleans(),
    st.booleans(),
)


@pytest.mark.sd_scripts
@given(settings=settings_st, w=st.integers(1, 8000), h=st.integers(1, 8000))
def test_same_choice_as_sd_scripts(sd_buckets: Any, settings: BucketSettings, w: int, h: int) -> None:
    assert _ours(settings, w, h) == _sd_select(sd_buckets, settings, w, h)


@pytest.mark.sd_scripts
@given(
    res=st.tuples(st.integers(64, 2048), st.integers(64, 2048)),
    lo=st.integers(16, 1024),
    hi=st.integers(256, 4096),
    steps=steps_st,
)
def test_same_predefined_resolutions_as_sd_scripts(
    sd_buckets: Any, res: tuple[int, int], lo: int, hi: int, steps: int
) -> None:
    _, sd_make = sd_buckets
    assert make_bucket_resolutions(res, lo, hi, steps) == sd_make(res, lo, hi, steps)


@pytest.mark.sd_scripts
@given(w=st.integers(16, 4096), h=st.integers(16, 4096), no_up=st.booleans())
def test_same_choice_as_sd_scripts_at_the_usual_settings(
    sd_buckets: Any, w: int, h: int, no_up: bool
) -> None:
    s = BucketSettings((1024, 1024), True, 256, 2048, 64, no_up)
    assert _ours(s, w, h) == _sd_select(sd_buckets, s, w, h)
