"""Encode throughput: latentcache's pipelined encoder against sd-scripts' caching loop and the VAE alone.

Usage: python benches/bench_encode.py [--images N] [--batch-size B] [--json] [--gpu] [--dir DIR]
       python benches/bench_encode.py --gpu [--device cuda] [--config full] [--resolution 1024]
           [--jsonl FILE] [--no-compile]

Every figure and ratio comes from the same run, on the same machine:

- ``serial (sd-scripts loop)``: a faithful copy of the structure of sd-scripts' ``new_cache_latents`` +
  ``_default_cache_batch_latents`` + ``save_latents_to_disk``: images sorted by bucket area, decoded on a
  thread pool only once their batch is formed (at most ``batch_size`` threads), resized and cropped in
  the main thread, ``ToTensor`` + ``Normalize`` in float32 on the CPU, a pageable float32 upload, the
  stock 3-D VAE (flips in a second forward), a synchronous ``.to("cpu")``, a synchronous read-modify-write
  ``np.savez`` per image, and ``gc.collect()`` (+ ``torch.cuda.empty_cache()``) after every batch.
- ``pipeline (stock 3-D VAE)``: ``encode_items`` with the same VAE: the overlap alone.
- ``pipeline (folded)``: ``encode_items`` with ``build_encoder`` (the exact 2-D fold), what users get.
- ``VAE alone (...)``: only the encoder's forwards, on pixels decoded, batched and put on the device
  beforehand, in the same batches: the limit for the pipeline with that encoder.

CPU mode (default) runs torch on one intra-op thread (``--threads``) for every row: the CPU VAE stands in
for a GPU, which leaves the other cores to decoding and writing (with torch on every core, each extra
thread oversubscribes them and OpenMP's barriers make every row slow and noisy). It runs two
configurations of a random Qwen-Image VAE on a few hundred generated JPEG/PNG images of 300-1200 px put
in sd-scripts' predefined buckets around 128x128: ``tiny`` (base_dim 8, one res block per stage:
decoding, resizing and writing weigh as much as the VAE, as on a GPU) and ``vae-bound`` (base_dim 32,
two res blocks: the VAE dominates). ``--gpu`` runs the full-size Qwen-Image VAE
(random weights, bf16) on 1024x1024 JPEGs on CUDA: the stock 3-D encoder, the folded one, folded +
``torch.compile`` (with its compile time), the folded one in ``channels_last``, the serial loop and the
pipeline, with each row's peak GPU memory; sized to finish within 8 minutes on one H100. With ``--gpu``
every row is also printed as one JSON line on stdout as soon as it is measured (and appended to
``--jsonl FILE``), so a run cut short still leaves its raw figures. ``--gpu --device cpu --config tiny
--resolution 128 --images 8`` runs the same code end to end on a CPU (a dry run of the GPU bench).
Both modes share every function below.

sd-scripts' own ``new_cache_latents`` is not run here: it needs sd-scripts' full requirements
(accelerate, transformers, torchvision) and a dataset object; the serial loop reproduces its structure.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import latentcache as lc
import numpy as np
import torch
from latentcache.encode import preprocess
from latentcache.encode.pipeline import EncodeItem, as_encoder, encode_items

CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": {"base_dim": 8, "num_res_blocks": 1},
    "vae-bound": {"base_dim": 32, "num_res_blocks": 2},
    "full": {"base_dim": 96, "num_res_blocks": 2},
}


# -- data ---------------------------------------------------------------------------------------------


def bucket_resolutions(resolution: int, step: int, lo: int, hi: int) -> list[tuple[int, int]]:
    """sd-scripts' predefined buckets (make_bucket_resolutions): widths in steps, heights filling the area."""
    area = resolution * resolution
    resos = {(resolution, resolution)}
    w = lo
    while w <= hi:
        h = min(hi, (area // w) // step * step)
        if h >= lo:
            resos.add((w, h))
            resos.add((h, w))
        w += step
    return sorted(resos)


def select_bucket(size: tuple[int, int], resos: list[tuple[int, int]]) -> tuple[int, int]:
    """The predefined bucket with the closest aspect ratio (sd-scripts' ``select_bucket``)."""
    if size in resos:
        return size
    ar = size[0] / size[1]
    errors = np.abs(np.array([w / h for w, h in resos]) - ar)
    return resos[int(errors.argmin())]


def make_images(folder: Path, n: int, lo: int, hi: int, seed: int = 0, square: bool = False) -> list[Path]:
    """``n`` photo-like images (smooth colour fields plus grain), JPEG and PNG mixed (JPEG only when
    ``square``, all ``lo`` x ``lo``)."""
    from PIL import Image

    def one(i: int) -> Path:
        r = np.random.default_rng(seed * 100003 + i)
        w, h = (lo, lo) if square else (int(r.integers(lo, hi + 1)), int(r.integers(lo, hi + 1)))
        coarse = r.integers(0, 256, (max(2, h // 64), max(2, w // 64), 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), np.int16)
        img = np.clip(img + r.integers(-6, 7, img.shape), 0, 255).astype(np.uint8)
        jpeg = square or i % 3 != 0
        p = folder / f"img{i:05d}.{'jpg' if jpeg else 'png'}"
        Image.fromarray(img).save(p, **({"quality": 92} if jpeg else {}))
        return p

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        paths = list(pool.map(one, range(n)))
    return paths


def make_items(paths: list[Path], resos: list[tuple[int, int]], flip: bool = False) -> list[EncodeItem]:
    items = []
    for p in paths:
        w, h = lc_image_size(p)
        bucket = select_bucket((w, h), resos)
        items.append(EncodeItem(str(p), lc.cache_path(str(p), (w, h)), bucket, flip=flip))
    return items


def lc_image_size(p: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(p) as im:
        return int(im.size[0]), int(im.size[1])


def clear_caches(folder: Path) -> None:
    for f in folder.glob("*_anima.npz"):
        f.unlink()


# -- models -------------------------------------------------------------------------------------------


def make_vae(config: str, device: str, dtype: torch.dtype) -> Any:
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(0)
    kw = CONFIGS[config]
    vae = AutoencoderKLQwenImage(base_dim=kw["base_dim"], z_dim=16, num_res_blocks=kw["num_res_blocks"])
    vae = vae.eval().requires_grad_(False).to(device)
    return vae if dtype == torch.float32 else vae.to(dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_BASE = [0]


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        _BASE[0] = torch.cuda.memory_allocated(device)


def peak_gib(device: torch.device) -> float | None:
    """GPU memory allocated at the peak since ``reset_peak``, above what was allocated then (weights,
    pre-decoded batches)."""
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) - _BASE[0]) / 2**30
    return None


# -- (a) the serial sd-scripts-style loop -------------------------------------------------------------


def _save_rmw(path: str, latents: torch.Tensor, original_size: Any, crop: Any, flipped: Any) -> None:
    """sd-scripts' ``save_latents_to_disk``: load every existing member, then ``np.savez`` onto the path."""
    kwargs: dict[str, Any] = {}
    if os.path.exists(path):
        npz = np.load(path)
        for key in npz.files:
            kwargs[key] = npz[key]
    sfx = f"_{latents.shape[-2]}x{latents.shape[-1]}"
    kwargs["latents" + sfx] = latents.float().cpu().numpy()
    kwargs["original_size" + sfx] = np.array(original_size)
    kwargs["crop_ltrb" + sfx] = np.array(crop)
    if flipped is not None:
        kwargs["latents_flipped" + sfx] = flipped.float().cpu().numpy()
    np.savez(path, **kwargs)


def serial_loop(items: list[EncodeItem], vae: Any, batch_size: int) -> int:
    """sd-scripts' caching structure (see the module docstring); returns the images written."""
    from latentcache.encode.vae import encode_pixels, vae_device_dtype

    device, dtype = vae_device_dtype(vae)
    device = torch.device(device)
    order = sorted(items, key=lambda it: it.bucket[0] * it.bucket[1])
    workers = max(1, min(os.cpu_count() or 1, len(order), batch_size))
    written = 0

    def submit(batch: list[tuple[EncodeItem, Any]]) -> None:
        nonlocal written
        images = [(it, fut.result()) for it, fut in batch]
        tensors, sizes, crops = [], [], []
        for it, img in images:
            resized = preprocess.resized_size_for((img.shape[1], img.shape[0]), it.bucket)
            img, original, crop = preprocess.trim_and_resize(img, it.bucket, resized)
            t = torch.from_numpy(np.ascontiguousarray(img[:, :, :3]).transpose(2, 0, 1)).contiguous()
            tensors.append(t.to(torch.float32).div(255).sub_(0.5).div_(0.5))
            sizes.append(original)
            crops.append(crop)
        x = torch.stack(tensors).to(device=device, dtype=dtype)
        with torch.no_grad():
            lat = encode_pixels(vae, x).to("cpu")
            flipped = encode_pixels(vae, torch.flip(x, dims=[3])).to("cpu") if batch[0][0].flip else None
        for i, (it, _) in enumerate(images):
            _save_rmw(it.cache_path, lat[i], sizes[i], crops[i], None if flipped is None else flipped[i])
            written += 1
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    with ThreadPoolExecutor(workers) as pool:
        batch: list[tuple[EncodeItem, Any]] = []
        cond = None
        for it in order:
            c = (it.bucket, it.flip, it.alpha, it.random_crop)
            if batch and c != cond:
                submit(batch)
                batch = []
            batch.append((it, pool.submit(preprocess.load_image, it.image_path, it.alpha)))
            cond = c
            if len(batch) >= batch_size:
                submit(batch)
                batch = []
        if batch:
            submit(batch)
    sync(device)
    return written


# -- (c) the VAE alone --------------------------------------------------------------------------------


def predecoded_batches(items: list[EncodeItem], enc: Any, batch_size: int) -> list[torch.Tensor]:
    """The batches the pipeline forms (by bucket, full first), decoded and on the device in advance."""
    by: dict[tuple[int, int], list[np.ndarray]] = {}
    for it in items:
        by.setdefault(it.bucket, []).append(preprocess.preprocess_image(it.image_path, it.bucket).pixels)
    batches = []
    for pix in by.values():
        for lo in range(0, len(pix), batch_size):
            x = torch.from_numpy(np.stack(pix[lo : lo + batch_size])).to(enc.device)
            x = x.permute(0, 3, 1, 2).contiguous().float().div_(255).sub_(0.5).div_(0.5).to(enc.dtype)
            if items[0].flip:
                x = torch.cat([x, x.flip(3)])
            batches.append(x)
    return batches


def vae_alone(enc: Any, batches: list[torch.Tensor]) -> float:
    """Seconds for one forward per batch (synchronised at the end)."""
    device = torch.device(enc.device)
    sync(device)
    t = time.perf_counter()
    with torch.inference_mode():
        for x in batches:
            enc(x)
    sync(device)
    return time.perf_counter() - t


def max_abs(a: Any, b: Any, x: torch.Tensor) -> float:
    """Largest absolute difference between two encoders' latents for one batch (a sanity check of the
    rows: the fold, channels_last and compile must not change what is computed beyond rounding)."""
    with torch.inference_mode():
        return float((a(x).float() - b(x).float()).abs().max())


# -- the table ----------------------------------------------------------------------------------------


_JSONL: list[Any] = []  # (config, file or None) when rows are emitted as JSON lines (--gpu)


def emit(record: dict[str, Any]) -> None:
    """One JSON line on stdout (and in --jsonl), flushed at once: raw figures survive a cut-short run."""
    if not _JSONL:
        return
    line = json.dumps(record, default=str)
    print(line, flush=True)
    if _JSONL[0] is not None:
        with open(_JSONL[0], "a", encoding="utf-8") as f:
            f.write(line + "\n")


def measure(
    label: str, n: int, fn: Callable[[], Any], device: torch.device, config: str = ""
) -> dict[str, Any]:
    reset_peak(device)
    t = time.perf_counter()
    extra = fn()
    sync(device)
    s = time.perf_counter() - t
    row: dict[str, Any] = {"label": label, "images": n, "seconds": s, "images_per_s": n / s}
    if isinstance(extra, dict):
        row.update(extra)
    peak = peak_gib(device)
    if peak is not None:
        row["peak_gib"] = peak
    print(f"  {label:<38} {n / s:9.2f} images/s  ({s:.1f} s)" + (f", peak {peak:.2f} GiB" if peak else ""),
          file=sys.stderr, flush=True)  # fmt: skip
    emit({"kind": "row", "config": config, "device": str(device), **row})
    return row


def run_config(
    config: str,
    folder: Path,
    paths: list[Path],
    resos: list[tuple[int, int]],
    *,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int,
    serial: bool,
    stock_pipeline: bool,
    compile_: bool,
    channels_last: bool = False,
    flip: bool = False,
    decode_workers: int | None = None,
    write_workers: int = 2,
) -> dict[str, Any]:
    """Every row of one VAE configuration; ratios against the serial loop and the VAE alone."""
    from latentcache.encode.encoders import build_encoder

    print(f"{config}: {len(paths)} images, batch {batch_size}, {device} {dtype}", file=sys.stderr, flush=True)
    items = make_items(paths, resos, flip=flip)
    n = len(items)
    vae = make_vae(config, str(device), dtype)
    stock = as_encoder(vae)
    folded = build_encoder(vae, "anima")
    rows: dict[str, dict[str, Any]] = {}

    def pipe(enc: Any) -> Callable[[], dict[str, Any]]:
        def go() -> dict[str, Any]:
            clear_caches(folder)
            s = encode_items(
                items, enc, batch_size=batch_size, decode_workers=decode_workers, write_workers=write_workers,
                progress=False,
            )  # fmt: skip
            if s.encoded != n:
                print(f"  warning: {s.format()}", file=sys.stderr)
            return {"vae_busy": s.vae_busy, "batches": s.batches, "failed": s.failed}

        return go

    # Every batch shape once through each encoder before any timing (oneDNN primitives and cuDNN
    # plans are made per shape): no row pays a first-call cost another row does not.
    batches = predecoded_batches(items, folded, batch_size)
    shapes = list({tuple(x.shape): x for x in batches}.values())
    vae_alone(folded, shapes)
    vae_alone(stock, shapes)
    checks = {"folded_vs_stock_max_abs": max_abs(folded, stock, batches[0])}

    if serial:

        def serial_run() -> None:
            clear_caches(folder)
            assert serial_loop(items, vae, batch_size) == n

        rows["serial"] = measure("serial (sd-scripts loop, stock 3-D)", n, serial_run, device, config)
    if stock_pipeline:
        rows["pipeline_stock"] = measure("pipeline (stock 3-D VAE)", n, pipe(stock), device, config)
    rows["pipeline"] = measure("pipeline (folded)", n, pipe(folded), device, config)
    if device.type == "cuda" or stock_pipeline or channels_last:
        rows["vae_stock"] = measure(
            "VAE alone (stock 3-D)", n, lambda: vae_alone(stock, batches), device, config
        )
    rows["vae"] = measure("VAE alone (folded)", n, lambda: vae_alone(folded, batches), device, config)
    if channels_last:
        # The same folded weights in NHWC (cuDNN's native layout for bf16 tensor-core convolutions).
        cl = build_encoder(vae, "anima")
        assert cl.module is not None
        cl.module.to(memory_format=torch.channels_last)
        cl_batches = [x.contiguous(memory_format=torch.channels_last) for x in batches]
        vae_alone(cl, list({tuple(x.shape): x for x in cl_batches}.values()))
        checks["channels_last_vs_folded_max_abs"] = max_abs(cl, folded, batches[0])
        rows["vae_channels_last"] = measure(
            "VAE alone (folded, channels_last)", n, lambda: vae_alone(cl, cl_batches), device, config
        )
        del cl, cl_batches
    if compile_:
        compiled = build_encoder(vae, "anima", compile=True)
        reset_peak(device)
        t = time.perf_counter()
        vae_alone(compiled, shapes)  # the first forward of each shape compiles
        compile_s = time.perf_counter() - t
        emit({"kind": "compile", "config": config, "device": str(device), "compile_s": compile_s,
              "shapes": [list(x.shape) for x in shapes]})  # fmt: skip
        print(f"  compile (first forward of {len(shapes)} shape(s)): {compile_s:.1f} s", file=sys.stderr)
        rows["vae_compiled"] = measure(
            "VAE alone (folded + compile)", n, lambda: vae_alone(compiled, batches), device, config
        )
        rows["vae_compiled"]["compile_s"] = compile_s
        checks["compiled_vs_folded_max_abs"] = max_abs(compiled, folded, batches[0])
        # Another bucket shape (W != H, another batch size): one dynamic graph should serve it without a
        # recompile as long as the first compile (seconds here vs compile_s tell which happened).
        b0, _, h0, w0 = batches[0].shape
        other = torch.rand((max(2, b0 // 2), 3, h0 * 3 // 4 // 16 * 16, w0), device=device).mul_(2).sub_(1)
        t = time.perf_counter()
        checks["compiled_vs_folded_other_shape_max_abs"] = max_abs(compiled, folded, other.to(dtype))
        checks["compiled_other_shape_first_call_s"] = time.perf_counter() - t
        rows["pipeline_compiled"] = measure("pipeline (folded + compile)", n, pipe(compiled), device, config)
    clear_caches(folder)
    emit({"kind": "check", "config": config, "device": str(device), **checks})
    print(f"  checks: {checks}", file=sys.stderr)

    ratios: dict[str, float] = {}
    base = rows.get("serial")
    for row in rows.values():
        if base is not None:
            row["vs_serial"] = row["images_per_s"] / base["images_per_s"]
        row["vs_vae_alone"] = row["images_per_s"] / rows["vae"]["images_per_s"]
    ratios["pipeline_vs_vae_alone"] = rows["pipeline"]["vs_vae_alone"]
    if base is not None:
        ratios["pipeline_vs_serial"] = rows["pipeline"]["vs_serial"]
    if "pipeline_compiled" in rows and "vae_compiled" in rows:
        ratios["pipeline_compiled_vs_vae_compiled"] = (
            rows["pipeline_compiled"]["images_per_s"] / rows["vae_compiled"]["images_per_s"]
        )
    return {
        "config": config, "images": n, "batch_size": batch_size, "rows": rows, "ratios": ratios,
        "vae": CONFIGS[config], "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "checks": checks,
    }  # fmt: skip


def print_table(results: list[dict[str, Any]]) -> None:
    head = ("config", "row", "images/s", "vs serial", "vs VAE", "VAE busy", "peak GiB")
    print("{:<10} {:<38} {:>9} {:>9} {:>7} {:>8} {:>8}".format(*head))
    for res in results:
        for row in res["rows"].values():
            vs = f"{row['vs_serial']:.2f}x" if "vs_serial" in row else "-"
            busy = f"{100 * row['vae_busy']:.0f}%" if "vae_busy" in row else "-"
            peak = f"{row['peak_gib']:.2f}" if "peak_gib" in row else "-"
            print(f"{res['config']:<10} {row['label']:<38} {row['images_per_s']:9.2f} {vs:>9} "
                  f"{row['vs_vae_alone']:6.2f}x {busy:>8} {peak:>8}")  # fmt: skip
        extra = {k: round(v, 3) for k, v in res["ratios"].items()}
        print(f"{res['config']:<10} ratios: {extra}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=None, help="images (default 200 on CPU, 384 with --gpu)")
    ap.add_argument("--batch-size", type=int, default=None, help="VAE batch (default 4 on CPU, 8 with --gpu)")
    ap.add_argument("--gpu", action="store_true", help="the full-size VAE at 1024x1024 in bf16 on CUDA")
    ap.add_argument("--no-compile", action="store_true", help="with --gpu: skip the torch.compile rows")
    ap.add_argument(
        "--device",
        default=None,
        help="with --gpu: the device (default cuda; cpu runs the GPU bench as a dry run)",
    )
    ap.add_argument(
        "--config", choices=sorted(CONFIGS), default="full", help="with --gpu: the VAE size (default full)"
    )
    ap.add_argument(
        "--resolution", type=int, default=1024, help="with --gpu: square image size (default 1024)"
    )
    ap.add_argument("--jsonl", help="with --gpu: also append every row as a JSON line to this file")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU mode: torch intra-op threads for every row (default 1: the CPU VAE stands in for a GPU, "
        "which leaves the other cores to decoding and writing; 0 = torch's default)",
    )
    ap.add_argument("--dir", help="folder for the images and caches (default: a temporary folder)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON on stdout")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="lc-bench-encode-"))
    root.mkdir(parents=True, exist_ok=True)
    results = []
    meta = {"torch": torch.__version__, "cpu_count": os.cpu_count()}
    try:
        if args.gpu:
            device = torch.device(args.device or "cuda")
            if device.type == "cuda" and not torch.cuda.is_available():
                sys.exit("--gpu needs CUDA (or --device cpu for a dry run)")
            _JSONL.append(args.jsonl)
            if device.type == "cuda":
                torch.backends.cudnn.benchmark = True
                meta.update(
                    gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(),
                )  # fmt: skip
            compile_ = not args.no_compile
            if compile_ and device.type == "cuda":
                try:
                    import triton  # noqa: F401
                except ImportError:
                    print("triton is not installed: the torch.compile rows are skipped", file=sys.stderr)
                    compile_ = False
            n = args.images or 384
            bs = args.batch_size or 8
            res = args.resolution
            emit({"kind": "meta", "images": n, "batch_size": bs, "resolution": res, "config": args.config,
                  "dtype": "bfloat16", **meta})  # fmt: skip
            folder = root / "gpu"
            folder.mkdir(exist_ok=True)
            t = time.perf_counter()
            paths = make_images(folder, n, res, res, square=True)
            print(f"made {n} {res}x{res} JPEGs in {time.perf_counter() - t:.1f} s", file=sys.stderr)
            results.append(
                run_config(args.config, folder, paths, [(res, res)], device=device, dtype=torch.bfloat16,
                           batch_size=bs, serial=True, stock_pipeline=False, compile_=compile_,
                           channels_last=True, write_workers=8)
            )  # fmt: skip
            emit({"kind": "ratios", "config": args.config, **results[-1]["ratios"]})
        else:
            device = torch.device("cpu")
            if args.threads > 0:
                torch.set_num_threads(args.threads)
            n = args.images or 200
            bs = args.batch_size or 4
            folder = root / "cpu"
            folder.mkdir(exist_ok=True)
            t = time.perf_counter()
            paths = make_images(folder, n, 300, 1200)
            print(f"made {n} images (300-1200 px) in {time.perf_counter() - t:.1f} s", file=sys.stderr)
            resos = bucket_resolutions(128, 32, 64, 256)
            results.append(
                run_config("tiny", folder, paths, resos, device=device, dtype=torch.float32, batch_size=bs,
                           serial=True, stock_pipeline=True, compile_=False)
            )  # fmt: skip
            results.append(
                run_config("vae-bound", folder, paths[: max(bs, n // 2)], resos, device=device,
                           dtype=torch.float32, batch_size=bs, serial=True, stock_pipeline=False,
                           compile_=False)
            )  # fmt: skip
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    meta.update(
        threads=torch.get_num_threads(), load_avg=os.getloadavg() if hasattr(os, "getloadavg") else None
    )
    if args.json:
        print(json.dumps({"meta": meta, "results": results}, indent=1))
    else:
        print_table(results)
        print(f"meta: {meta}")


if __name__ == "__main__":
    main()
