"""The second run's startup through sd-scripts' real code: stock sd-scripts against latentcache ``install()``.

Usage (needs an sd-scripts checkout and an interpreter with its requirements; without them it says so
and exits 0):

    SD_SCRIPTS_DIR=/path/to/sd-scripts python benches/bench_startup.py [--sizes 1000,10000] [--large]
        [--repeats 3] [--kinds folder,metadata] [--no-cold] [--stock-caches] [--dir DIR] [--json]

For each N (1,000 and 10,000; ``--large`` adds 100,000) it builds once, in DIR (default: a temporary
folder, removed afterwards): a folder (DreamBooth) dataset of N small PNGs with caption files, and a
metadata-json (fine-tuning) dataset of N PNGs whose metadata records ``image_size``; then every
image's cache, as latentcache's first run leaves it (``write_latents``, with the image's source
fingerprint), or with ``--stock-caches`` as stock sd-scripts' first run leaves it (``np.savez``, no
fingerprint). Bucketing as in the integration tests (resolution 64, buckets 32..256 in steps of 16).

Then it times the second run: sd-scripts' ``config_util`` dataset build (``DreamBoothDataset`` /
``FineTuningDataset``, ``make_buckets``) plus ``DatasetGroup.new_cache_latents``, each run in a fresh
subprocess (imports excluded from the time), stock and latentcache alternated, ``--repeats`` times,
the best kept (a warm run's first repeat warms the page cache); with and without
``--skip_cache_check``; warm and, as root on Linux, cold (``sync; echo 3 > /proc/sys/vm/drop_caches``
in the child after its imports, before the timed part). The VAE is
a tiny sd-scripts Qwen-Image VAE that must never be called: a run that encodes anything is an error.

It prints one table per N and dataset kind (seconds, ratio = latentcache / stock, below 1 is faster),
or with ``--json`` a list of rows: ``n``, ``kind``, ``skip``, ``cold``, ``stock_s``, ``latentcache_s``,
``ratio``, and each side's ``build_s`` / ``cache_s`` split.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from latentcache.bench import drop_caches

HERE = Path(__file__).resolve()
RESOLUTION = 64
# (w, h) of the generated images: a mix of aspect ratios, so images land in several buckets.
SHAPES = [(96, 64), (64, 96), (80, 80), (200, 90), (40, 56), (130, 131), (33, 100), (128, 72)]


def _sd_dir() -> str | None:
    d = os.environ.get("SD_SCRIPTS_DIR", "")
    return d if d and (Path(d) / "library" / "strategy_anima.py").is_file() else None


def _toml(path: Path, subset: dict[str, Any]) -> Path:
    lines = [
        "[general]",
        "enable_bucket = true",
        "bucket_reso_steps = 16",
        "min_bucket_reso = 32",
        "max_bucket_reso = 256",
        "caption_extension = '.txt'",
        "",
        "[[datasets]]",
        f"resolution = {RESOLUTION}",
        "batch_size = 1",
        "",
        "  [[datasets.subsets]]",
    ]
    lines += [f"  {k} = {json.dumps(v)}" for k, v in subset.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


# -- the child processes --------------------------------------------------------------------------


def _setup(spec: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
    sd_dir = spec["sd_dir"]
    sys.path.insert(0, sd_dir)
    import logging

    logging.disable(logging.WARNING)  # both sides log the same way; keep the output quiet
    os.environ.setdefault("TQDM_DISABLE", "1")
    if spec.get("install"):
        from latentcache import sd_scripts

        sd_scripts.install()
    import anima_train_network
    from library import config_util, strategy_anima, strategy_base, train_util

    parser = anima_train_network.setup_parser()
    args = parser.parse_args(
        ["--dataset_config", spec["config"], "--cache_latents", "--cache_latents_to_disk",
         "--vae_batch_size", "4", "--seed", "1"]
        + (["--skip_cache_check"] if spec.get("skip") else [])
    )  # fmt: skip
    train_util.prepare_dataset_args(args, True)
    return args, config_util, strategy_anima, strategy_base


def _build_datasets(args: Any, config_util: Any) -> Any:
    user_config = config_util.load_user_config(args.dataset_config)
    blueprint = config_util.BlueprintGenerator(config_util.ConfigSanitizer(True, True, False, True)).generate(
        user_config, args
    )
    group, _ = config_util.generate_dataset_group_by_blueprint(blueprint.dataset_group)
    group.verify_bucket_reso_steps(16)
    return group


def _tiny_vae() -> Any:
    import torch
    from library import qwen_image_autoencoder_kl as qk

    torch.manual_seed(0)
    vae = qk.AutoencoderKLQwenImage(
        base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, attn_scales=[],
        temperal_downsample=[False, True, True],
    )  # fmt: skip
    return vae.eval()


class _Accelerator:
    num_processes = 1
    process_index = 0

    def __init__(self) -> None:
        import torch

        self.device = torch.device("cpu")

    def wait_for_everyone(self) -> None:
        pass


def _child_make_caches(spec: dict[str, Any]) -> dict[str, Any]:
    """Write every image's cache (latentcache's writer, or np.savez for ``stock``), zeros as latents."""
    import numpy as np

    args, config_util, strategy_anima, strategy_base = _setup({**spec, "install": True})
    strategy = strategy_anima.AnimaLatentsCachingStrategy(True, 4, False)
    strategy_base.LatentsCachingStrategy.set_strategy(strategy)
    group = _build_datasets(args, config_util)
    from latentcache import sd_scripts
    from latentcache.anima import crop_ltrb
    from latentcache.cache.meta import source_fingerprint
    from latentcache.cache.write import write_latents

    written = 0
    for ds in group.datasets:
        sd_scripts.repair_dataset(ds)
        for info in ds.image_data.values():
            image = info.absolute_path
            size = (int(info.image_size[0]), int(info.image_size[1]))
            bw, bh = int(info.bucket_reso[0]), int(info.bucket_reso[1])
            npz = strategy.get_latents_npz_path(image, size)
            latents = np.zeros((16, bh // 8, bw // 8), np.float32)
            crop = np.asarray(crop_ltrb((bw, bh), size), np.float64)
            if spec["stock_caches"]:
                sfx = f"_{bh // 8}x{bw // 8}"
                np.savez(
                    npz,
                    **{
                        "latents" + sfx: latents,
                        "original_size" + sfx: np.asarray(size, np.int64),
                        "crop_ltrb" + sfx: crop,
                    },
                )
            else:
                write_latents(
                    npz, latents=latents, original_size=np.asarray(size, np.int64), crop_ltrb=crop,
                    meta={"source": source_fingerprint(image)}, durable=False,
                )  # fmt: skip
            written += 1
    return {"written": written}


def _child_time(spec: dict[str, Any]) -> dict[str, Any]:
    """One second run: dataset build + new_cache_latents, imports and the VAE's construction excluded."""
    args, config_util, strategy_anima, strategy_base = _setup(spec)
    vae = _tiny_vae()
    encoded = [0]
    cls = strategy_anima.AnimaLatentsCachingStrategy
    original = cls.cache_batch_latents

    def counting(self: Any, model: Any, infos: list[Any], *a: Any) -> None:
        encoded[0] += len(infos)
        original(self, model, infos, *a)

    cls.cache_batch_latents = counting
    if spec.get("install"):
        from latentcache.encode import pipeline

        original_items = pipeline.encode_items

        def counting_items(items: list[Any], *a: Any, **kw: Any) -> Any:
            encoded[0] += len(items)
            return original_items(items, *a, **kw)

        pipeline.encode_items = counting_items  # type: ignore[assignment]

    if spec.get("cold"):
        # After the imports: the dataset's files are cold, the interpreter's already loaded.
        drop_caches()
    t0 = time.perf_counter()
    strategy = cls(args.cache_latents_to_disk, args.vae_batch_size, args.skip_cache_check)
    strategy_base.LatentsCachingStrategy.set_strategy(strategy)
    group = _build_datasets(args, config_util)
    t1 = time.perf_counter()
    group.new_cache_latents(vae, _Accelerator())
    t2 = time.perf_counter()
    images = sum(len(ds.image_data) for ds in group.datasets)
    return {
        "build_s": t1 - t0,
        "cache_s": t2 - t1,
        "total_s": t2 - t0,
        "encoded": encoded[0],
        "images": images,
    }


# -- the parent -----------------------------------------------------------------------------------


def _child(spec: dict[str, Any], pythonpath: str | None = None) -> dict[str, Any]:
    env = None
    if pythonpath:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [pythonpath, os.environ.get("PYTHONPATH")])),
        }
    proc = subprocess.run(
        [sys.executable, str(HERE), "--child", json.dumps(spec)],
        capture_output=True, text=True, timeout=3600, env=env,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({spec.get('mode')}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _build(root: Path, n: int, stock_caches: bool, sd_dir: str) -> dict[str, Path]:
    """The two datasets of N images each, and their caches; reused when ``root`` already holds them."""
    import numpy as np
    from PIL import Image

    marker = root / f"built-{n}-{'stock' if stock_caches else 'latentcache'}"
    configs = {"folder": root / "folder.toml", "metadata": root / "metadata.toml"}
    if marker.exists():
        return configs
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    folder, meta_dir = root / "folder", root / "metadata"
    folder.mkdir()
    meta_dir.mkdir()
    rng = np.random.default_rng(0)
    tiles = {s: rng.integers(0, 256, (s[1], s[0], 3), dtype=np.uint8) for s in SHAPES}
    metadata: dict[str, Any] = {}
    for i in range(n):
        for d in (folder, meta_dir):
            size = SHAPES[(i * 7 + (d is meta_dir)) % len(SHAPES)]
            path = d / f"{i:07d}.png"
            Image.fromarray(tiles[size]).save(path, compress_level=1)
            if d is folder:
                (d / f"{i:07d}.txt").write_text("a picture")
            else:
                metadata[str(path)] = {"caption": "a picture", "image_size": list(size)}
    (root / "meta.json").write_text(json.dumps(metadata))
    _toml(configs["folder"], {"image_dir": str(folder)})
    _toml(configs["metadata"], {"image_dir": str(meta_dir), "metadata_file": str(root / "meta.json")})
    for kind, cfg in configs.items():
        out = _child({"mode": "make", "sd_dir": sd_dir, "config": str(cfg), "stock_caches": stock_caches})
        if out["written"] != n:
            raise RuntimeError(f"{kind}: {out['written']} caches written for {n} images")
    marker.touch()
    return configs


def _measure(
    cfg: Path, sd_dir: str, skip: bool, cold: bool, repeats: int, before: str | None = None
) -> dict[str, dict[str, float]]:
    best: dict[str, dict[str, float]] = {}
    base = {"mode": "time", "sd_dir": sd_dir, "config": str(cfg), "skip": skip, "cold": cold}
    impls = ["stock", "latentcache"] + (["before"] if before else [])
    for r in range(repeats):
        order = impls if r % 2 == 0 else impls[::-1]
        for impl in order:
            out = _child({**base, "install": impl != "stock"}, before if impl == "before" else None)
            if out["encoded"]:
                raise RuntimeError(f"{impl} encoded {out['encoded']} images on the second run of {cfg}")
            if impl not in best or out["total_s"] < best[impl]["total_s"]:
                best[impl] = out
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1000,10000", help="comma-separated N (default 1000,10000)")
    p.add_argument("--large", action="store_true", help="add N = 100,000")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--kinds", default="folder,metadata")
    p.add_argument("--no-cold", action="store_true")
    p.add_argument("--no-warm", action="store_true")
    p.add_argument("--skip", default="off,on", help="which --skip_cache_check settings: off,on")
    p.add_argument("--stock-caches", action="store_true", help="caches as stock sd-scripts writes them")
    p.add_argument("--dir", help="where to build the datasets (kept, and reused when built)")
    p.add_argument(
        "--before",
        metavar="DIR",
        help="also time another copy of the latentcache package (DIR holds its `latentcache` folder), "
        "alternated with the other two: a before/after comparison on the same machine and load",
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        spec = json.loads(a.child)
        out = _child_make_caches(spec) if spec["mode"] == "make" else _child_time(spec)
        print(json.dumps(out))
        return 0
    sd_dir = _sd_dir()
    if sd_dir is None:
        print("bench_startup: skipped: set SD_SCRIPTS_DIR to an sd-scripts checkout (and use an interpreter "
              "with its requirements) to time its second run")  # fmt: skip
        return 0
    sizes = [int(s) for s in a.sizes.split(",") if s]
    if a.large and 100_000 not in sizes:
        sizes.append(100_000)
    can_cold = (
        os.geteuid() == 0 and os.path.exists("/proc/sys/vm/drop_caches") if hasattr(os, "geteuid") else False
    )
    temps = []
    rows: list[dict[str, Any]] = []
    try:
        for n in sizes:
            if a.dir:
                root = Path(a.dir) / f"n{n}{'-stock' if a.stock_caches else ''}"
            else:
                root = Path(tempfile.mkdtemp(prefix=f"lc-startup-{n}-"))
                temps.append(root)
            t = time.perf_counter()
            configs = _build(root, n, a.stock_caches, sd_dir)
            if not a.json:
                print(f"N={n}: datasets ready in {time.perf_counter() - t:.1f} s ({root})", file=sys.stderr)
            for kind in a.kinds.split(","):
                for cold in ([False] if not a.no_warm else []) + (
                    [True] if can_cold and not a.no_cold else []
                ):
                    for skip in [s == "on" for s in a.skip.split(",")]:
                        best = _measure(configs[kind], sd_dir, skip, cold, a.repeats, a.before)
                        s, lc = best["stock"], best["latentcache"]
                        row = {"n": n, "kind": kind, "skip": skip, "cold": cold, "stock_s": s["total_s"],
                               "latentcache_s": lc["total_s"], "ratio": lc["total_s"] / s["total_s"],
                               "stock": s, "latentcache": lc,
                               # The floor: sd-scripts' own dataset build, which both sides run before
                               # any caching step; no drop-in can start faster than it.
                               "floor_s": min(s["build_s"], lc["build_s"])}  # fmt: skip
                        if "before" in best:
                            row["before"] = best["before"]
                            row["before_s"] = best["before"]["total_s"]
                        rows.append(row)
                        if not a.json:
                            _print_row(row)
    finally:
        for root in temps:
            shutil.rmtree(root, ignore_errors=True)
    if a.json:
        print(json.dumps(rows, indent=1))
    else:
        _print_table(rows, a.stock_caches)
    return 0


def _label(row: dict[str, Any]) -> str:
    return f"{'`--skip_cache_check`, ' if row['skip'] else ''}{'cold' if row['cold'] else 'warm'}"


def _print_row(row: dict[str, Any]) -> None:
    s, lc = row["stock"], row["latentcache"]
    b = row.get("before")
    print(
        f"  N={row['n']} {row['kind']:8s} {_label(row):28s} stock {s['total_s']:.3f} s "
        f"(build {s['build_s']:.3f} + cache {s['cache_s']:.3f})  latentcache {lc['total_s']:.3f} s "
        f"(build {lc['build_s']:.3f} + cache {lc['cache_s']:.3f})  ratio {row['ratio']:.2f}"
        + (
            f"  before {b['total_s']:.3f} s (build {b['build_s']:.3f} + cache {b['cache_s']:.3f})"
            if b
            else ""
        ),
        file=sys.stderr,
    )


def _print_table(rows: list[dict[str, Any]], stock_caches: bool) -> None:
    caches = "stock sd-scripts caches" if stock_caches else "caches written by latentcache"
    print(f"\nSecond run (dataset build + new_cache_latents), {caches}, best of the repeats:\n")
    before = any("before_s" in r for r in rows)
    extra = " latentcache before | ratio before |" if before else ""
    print(
        "| N | dataset | second run | stock sd-scripts | latentcache `install()` | ratio "
        f"| floor: dataset build alone | best ratio the floor allows |{extra}"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |" + (" --- | --- |" if before else ""))
    for r in rows:
        line = (
            f"| {r['n']:,} | {r['kind']} | {_label(r)} | {r['stock_s']:.3f} s | {r['latentcache_s']:.3f} s "
            f"| {_verdict(r['ratio'])} | {r['floor_s']:.3f} s | {_verdict(r['floor_s'] / r['stock_s'])} |"
        )
        if "before_s" in r:
            line += f" {r['before_s']:.3f} s | {_verdict(r['before_s'] / r['stock_s'])} |"
        print(line)


def _verdict(ratio: float) -> str:
    """latentcache's time over stock's, as the issue's table words it."""
    return f"{1 / ratio:.2f}x faster" if ratio <= 1 else f"**{ratio:.2f}x slower**"


if __name__ == "__main__":
    sys.exit(main())
