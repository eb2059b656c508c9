"""Caching through sd-scripts' real code: stock ``new_cache_latents`` against latentcache's drop-in.

Row (b) of issue 19's CPU benchmark. Needs ``SD_SCRIPTS_DIR`` (an sd-scripts checkout) and an interpreter
with sd-scripts' requirements (accelerate, transformers, torchvision, ...); without them it says so and
exits 0. Each run is a fresh process that builds the dataset through sd-scripts' config_util (a folder
subset with buckets around 128x128), sets the Anima strategy as the training script does, and times
``DatasetGroup.new_cache_latents`` alone with a small random sd-scripts Qwen-Image VAE on the CPU, caches
written to disk. Stock and latentcache runs alternate on the same images, every cache removed between
runs, so each encodes everything.

Usage: SD_SCRIPTS_DIR=... python benches/bench_encode_sd_scripts.py [--images N] [--runs R] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()


def _driver(spec: dict[str, Any]) -> dict[str, Any]:
    sys.path.insert(0, os.environ["SD_SCRIPTS_DIR"])
    import torch

    torch.set_num_threads(int(spec["threads"]))
    if spec["latentcache"]:
        from latentcache import sd_scripts

        sd_scripts.install()
    import anima_train_network
    from library import config_util, qwen_image_autoencoder_kl, strategy_anima, strategy_base, train_util

    args = anima_train_network.setup_parser().parse_args(
        ["--dataset_config", spec["config"], "--cache_latents", "--cache_latents_to_disk",
         "--vae_batch_size", str(spec["batch"]), "--seed", "1"]
    )  # fmt: skip
    train_util.prepare_dataset_args(args, True)
    strategy = strategy_anima.AnimaLatentsCachingStrategy(True, args.vae_batch_size, False)
    strategy_base.LatentsCachingStrategy.set_strategy(strategy)
    blueprint = config_util.BlueprintGenerator(config_util.ConfigSanitizer(True, True, False, True)).generate(
        config_util.load_user_config(args.dataset_config), args
    )
    group, _ = config_util.generate_dataset_group_by_blueprint(blueprint.dataset_group)
    torch.manual_seed(0)
    vae = qwen_image_autoencoder_kl.AutoencoderKLQwenImage(
        base_dim=spec["base_dim"], z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=spec["res_blocks"],
        attn_scales=[], temperal_downsample=[False, True, True],
    ).eval()  # fmt: skip

    class Accelerator:
        device = torch.device("cpu")
        num_processes, process_index = 1, 0

        def wait_for_everyone(self) -> None:
            pass

    t = time.perf_counter()
    group.new_cache_latents(vae, Accelerator())
    wall = time.perf_counter() - t
    written = len(list(Path(spec["images"]).glob("*_anima.npz")))
    return {"wall_s": wall, "caches": written}


def _images(folder: Path, n: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        w, h = (int(x) for x in rng.integers(300, 1201, size=2))
        arr = rng.integers(0, 256, size=(h // 8, w // 8, 3), dtype=np.uint8)
        img = Image.fromarray(arr).resize((w, h), Image.BILINEAR)
        img.save(folder / f"img{i:05d}.{'jpg' if i % 2 else 'png'}")


def _run(spec: dict[str, Any], tmp: Path) -> dict[str, Any]:
    spec_file = tmp / "spec.json"
    spec_file.write_text(json.dumps(spec))
    out = subprocess.run(
        [sys.executable, str(HERE), "--driver", str(spec_file)], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise SystemExit(f"driver failed:\n{out.stdout}\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--runs", type=int, default=2, help="runs of each, alternated")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each run")
    ap.add_argument("--base-dim", type=int, default=8, help="VAE width (8: tiny, decode and writes weigh)")
    ap.add_argument("--res-blocks", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--driver", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.driver:
        print(json.dumps(_driver(json.loads(Path(args.driver).read_text()))))
        return
    sd = os.environ.get("SD_SCRIPTS_DIR")
    if not sd:
        print("bench_encode_sd_scripts: set SD_SCRIPTS_DIR to an sd-scripts checkout to run this; skipped")
        return
    try:
        import accelerate  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        print(f"bench_encode_sd_scripts: this interpreter lacks sd-scripts' requirements ({e}); skipped")
        return
    with tempfile.TemporaryDirectory(prefix="lc-bench-sd-") as t:
        tmp = Path(t)
        images = tmp / "images"
        images.mkdir()
        _images(images, args.images)
        config = tmp / "data.toml"
        config.write_text(
            "[general]\nenable_bucket = true\nmin_bucket_reso = 64\nmax_bucket_reso = 256\n"
            "bucket_reso_steps = 16\n\n[[datasets]]\nresolution = 128\nbatch_size = 1\n\n"
            f"[[datasets.subsets]]\nimage_dir = '{images}'\n"
        )
        base = {
            "config": str(config), "images": str(images), "batch": args.batch, "threads": args.threads,
            "base_dim": args.base_dim, "res_blocks": args.res_blocks,
        }  # fmt: skip
        times: dict[str, list[float]] = {"stock": [], "latentcache": []}
        for _ in range(args.runs):
            for name in ("stock", "latentcache"):
                for p in images.glob("*.npz"):
                    p.unlink()
                r = _run({**base, "latentcache": name == "latentcache"}, tmp)
                if r["caches"] != args.images:
                    raise SystemExit(f"{name}: {r['caches']} caches written for {args.images} images")
                times[name].append(r["wall_s"])
    rows = {
        name: {"images_per_s": args.images / statistics.median(ts), "wall_s": ts}
        for name, ts in times.items()
    }
    rows["latentcache"]["vs_stock"] = rows["latentcache"]["images_per_s"] / rows["stock"]["images_per_s"]
    if args.json:
        print(
            json.dumps({"images": args.images, "batch": args.batch, "base_dim": args.base_dim, "rows": rows})
        )
        return
    print(f"{args.images} images, batch {args.batch}, VAE base_dim {args.base_dim}, threads {args.threads}")
    print(f"{'row':<40} {'images/s':>9} {'ratio':>7}")
    print(
        f"{'(b) sd-scripts new_cache_latents (stock)':<40} {rows['stock']['images_per_s']:>9.2f} {1.0:>6.2f}x"
    )
    lc = rows["latentcache"]
    print(
        f"{'latentcache drop-in (pipeline, folded)':<40} {lc['images_per_s']:>9.2f} {lc['vs_stock']:>6.2f}x"
    )


if __name__ == "__main__":
    main()
