"""The ``latentcache`` command line: one subcommand per job, exit status 0 ok, 1 problems found, 2 bad use."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import latentcache
from latentcache.errors import LatentCacheError
from latentcache.tools.cli import add_parsers as add_tool_parsers

__all__ = ["main"]

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2


def _report_to_dict(report: latentcache.ScanReport) -> dict[str, Any]:
    def cache(c: latentcache.CacheFile) -> dict[str, Any]:
        return {"path": c.path, "size": list(c.size)}

    return {
        "directories": report.directories,
        "files": report.files,
        "clean": report.is_clean,
        "images": [{"path": i.path, "caches": [cache(c) for c in i.caches]} for i in report.images],
        "images_without_cache": report.images_without_cache,
        "orphan_caches": [cache(c) for c in report.orphan_caches],
        "doubled_caches": [
            {"path": d.path, "size": list(d.size), "image": d.image} for d in report.doubled_caches
        ],
        "multi_size": [{"image": i.path, "caches": [cache(c) for c in i.caches]} for i in report.multi_size],
        "shared_stems": [{"stem": g.stem, "images": g.images} for g in report.shared_stems],
        "temp_files": report.temp_files,
    }


def _print_list(title: str, lines: list[str], limit: int = 10) -> None:
    if not lines:
        return
    print(f"{title}:")
    for line in lines[:limit]:
        print(f"  {line}")
    if len(lines) > limit:
        print(f"  ... and {len(lines) - limit} more (use --json for the full list)")


def _cmd_scan(args: argparse.Namespace) -> int:
    report = latentcache.scan_directory(args.dir, suffix=args.suffix, recursive=args.recursive)
    if args.remove_temp and report.temp_files:
        # Each removal takes the target's write lock, so a live writer's file is never removed.
        removed = sum(latentcache.remove_stale_temp(p) for p in report.temp_files)
        print(f"removed {removed} leftover temporary file(s)", file=sys.stderr)
        report = latentcache.scan_directory(args.dir, suffix=args.suffix, recursive=args.recursive)
    if args.json:
        json.dump(_report_to_dict(report), sys.stdout, indent=1)
        print()
        return EXIT_OK if report.is_clean else EXIT_PROBLEMS
    cached = len(report.images) - len(report.images_without_cache)
    print(f"{args.dir}: {report.files} files in {report.directories} folder(s)")
    print(f"  images:                {len(report.images)}")
    print(f"  images with a cache:   {cached}")
    print(f"  images without cache:  {len(report.images_without_cache)}")
    print(f"  orphan caches:         {len(report.orphan_caches)}")
    print(f"  doubled-suffix caches: {len(report.doubled_caches)}")
    print(f"  multi-size stems:      {len(report.multi_size)}")
    print(f"  shared stems:          {len(report.shared_stems)}")
    print(f"  writer temp files:     {len(report.temp_files)}")
    _print_list("orphan caches (no image with exactly this stem)", [c.path for c in report.orphan_caches])
    _print_list(
        "doubled-suffix caches (sd-scripts #2362 leftovers)",
        [f"{d.path} (image: {d.image or 'none found'})" for d in report.doubled_caches],
    )
    _print_list(
        "caches for several image sizes (stale caches of a replaced image)",
        [f"{i.path}: " + ", ".join(f"{c.size[0]}x{c.size[1]}" for c in i.caches) for i in report.multi_size],
    )
    _print_list(
        "images sharing one stem (they would share cache files)",
        [", ".join(g.images) for g in report.shared_stems],
    )
    _print_list("temporary files of killed writers (--remove-temp removes them)", report.temp_files)
    # Names only: `latentcache verify` opens the caches.
    print("no problems found in file names" if report.is_clean else "problems found")
    return EXIT_OK if report.is_clean else EXIT_PROBLEMS


def _cmd_verify(args: argparse.Namespace) -> int:
    statuses = latentcache.verify_directory(
        args.dir,
        recursive=args.recursive,
        suffix=args.suffix,
        verify_crc=args.crc,
        check_finite=args.finite,
        check_source=args.source,
        workers=args.workers,
    )
    files = len({s.path for s in statuses})
    bad = [s for s in statuses if not s.ok]
    codes: dict[str, int] = {}
    for s in statuses:
        codes[s.code] = codes.get(s.code, 0) + 1
    if args.json:
        doc = {
            "files": files,
            "checked": len(statuses),
            "codes": codes,
            "problems": [{"path": s.path, "code": s.code, "message": s.message} for s in bad],
        }
        json.dump(doc, sys.stdout, indent=1)
        print()
    else:
        print(f"{args.dir}: {files} cache files, {len(statuses)} resolutions checked")
        for code, count in sorted(codes.items(), key=lambda kv: (kv[0] != "ok", kv[0])):
            print(f"  {code + ':':<14}{count}")
        _print_list("problems", [s.message for s in bad])
        print("all caches are valid" if not bad else "problems found")
    return EXIT_OK if not bad else EXIT_PROBLEMS


def _cmd_bench(args: argparse.Namespace) -> int:
    from latentcache.bench import run_bench

    run_bench(args.dir, args.files, as_json=args.json, workers=args.workers)
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    from latentcache.sd_scripts import prepare_run, run_prepared

    try:
        path = prepare_run(args.script)
    except (OSError, ImportError) as exc:
        print(f"latentcache run: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    # The script's own exceptions and exit status pass through unchanged.
    run_prepared(path, args.args)
    return EXIT_OK


def _encode_subsets(args: argparse.Namespace) -> list[Any]:
    """The subsets ``encode`` works on: DIR as one folder, or the subsets of a dataset config."""
    from latentcache.encode import dataset
    from latentcache.encode.buckets import BucketSettings, parse_resolution

    if os.path.isfile(args.dir):
        if not args.dir.endswith(".toml"):
            raise dataset.DatasetConfigError(f"{args.dir}: not a folder or a dataset config (.toml)")
        defaults = {
            "resolution": args.resolution,
            "enable_bucket": args.enable_bucket,
            "min_bucket_reso": args.min_bucket_reso,
            "max_bucket_reso": args.max_bucket_reso,
            "bucket_reso_steps": args.bucket_reso_steps,
            "bucket_no_upscale": args.bucket_no_upscale,
            "flip_aug": args.flip_aug,
            "alpha_mask": args.alpha_mask,
        }
        return dataset.subsets_from_config(args.dir, defaults, recursive=args.recursive)
    if not os.path.isdir(args.dir):
        raise dataset.DatasetConfigError(f"{args.dir}: no such folder or dataset config")
    settings = BucketSettings(
        parse_resolution(args.resolution or "1024"),
        args.enable_bucket,
        args.min_bucket_reso,
        args.max_bucket_reso,
        args.bucket_reso_steps,
        args.bucket_no_upscale,
    )
    try:
        settings.adjusted()
    except ValueError as e:
        raise dataset.DatasetConfigError(str(e)) from None
    return dataset.subsets_from_folder(
        args.dir, settings, recursive=args.recursive, flip_aug=args.flip_aug, alpha_mask=args.alpha_mask
    )


def _init_distributed(device_arg: str | None) -> tuple[Any, int, int]:
    """The device, rank and world size; starts torch.distributed under torchrun (WORLD_SIZE > 1)."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if device_arg:
        try:
            device = torch.device(device_arg)
        except RuntimeError as e:
            raise ValueError(f"--device {device_arg}: {e}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {device_arg}: no CUDA device is available")
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None and world > 1:
        device = torch.device("cuda", local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world <= 1:
        return device, 0, 1
    dist = torch.distributed
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, dist.get_rank(), dist.get_world_size()


def _cmd_encode(args: argparse.Namespace) -> int:
    import importlib

    from latentcache import models
    from latentcache.encode import dataset

    schema = models.get(args.model)
    subsets = _encode_subsets(args)
    dataset.check_subsets(subsets, schema)

    import torch

    from latentcache.encode.encoders import build_encoder
    from latentcache.encode.pipeline import encode_items

    device, rank, world = _init_distributed(args.device)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    try:
        # Looked up at call time, so that a test can stand in another loader.
        load_vae = importlib.import_module("latentcache.encode.weights").load_vae
        vae = load_vae(args.vae, device=device, dtype=dtype)
        encoder = build_encoder(vae, schema, fold=not args.no_fold, compile=args.compile)
        todo = dataset.plan(subsets, model=schema, vae=encoder.fingerprint)
        if rank == 0 and not args.json:
            print(
                f"{args.dir}: {len(todo.images)} cache resolution(s) wanted: {todo.valid} valid, "
                f"{len(todo.todo)} to encode"
                + (f", {len(todo.unreadable)} image(s) unreadable" if todo.unreadable else ""),
                file=sys.stderr,
            )
        summary = encode_items(
            todo.items(),
            encoder,
            model=schema,
            batch_size=args.batch_size,
            decode_workers=args.decode_workers,
            progress=not args.json and bool(todo.todo),
            distributed=None,
        )
    finally:
        dist = torch.distributed
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    # The caches found valid before encoding count as skipped, so that the summary covers them all.
    summary.total += todo.valid
    summary.skipped += todo.valid
    failed = summary.failed + len(todo.unreadable)
    if rank != 0:
        return EXIT_OK if not failed and not summary.interrupted else EXIT_PROBLEMS
    if args.json:
        doc = {
            "source": args.dir,
            "model": schema.name,
            "images": len(todo.images),
            "valid": todo.valid,
            "to_encode": len(todo.todo),
            "unreadable": [{"path": p, "message": m} for p, m in todo.unreadable],
            "reencoded": [{"path": p, "message": m} for p, m in todo.invalid],
            "encoder": {
                "device": str(encoder.device),
                "dtype": dtype_name,
                "folded": bool(encoder.folded),
                "compiled": bool(getattr(encoder, "compiled", False)),
                "fingerprint": encoder.fingerprint,
            },
            "summary": summary.as_dict(),
        }
        json.dump(doc, sys.stdout, indent=1)
        print()
    else:
        print(summary.format())
        _print_list("images that cannot be read", [f"{p}: {m}" for p, m in todo.unreadable])
    return EXIT_OK if not failed and not summary.interrupted else EXIT_PROBLEMS


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="latentcache", description="Correct, crash-safe and fast latent caches for sd-scripts."
    )
    parser.add_argument("--version", action="version", version=f"latentcache {latentcache.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    scan = sub.add_parser("scan", help="pair images and caches exactly by stem and report problems")
    scan.add_argument("dir", help="the image folder")
    scan.add_argument("--recursive", "-r", action="store_true", help="also scan subfolders")
    scan.add_argument("--json", action="store_true", help="print the full report as JSON")
    scan.add_argument(
        "--remove-temp",
        action="store_true",
        help="remove temporary files left by killed writers (under lock)",
    )
    scan.add_argument(
        "--suffix", default=latentcache.DEFAULT_SUFFIX, help="cache suffix (default %(default)s)"
    )
    scan.set_defaults(func=_cmd_scan)

    verify = sub.add_parser(
        "verify",
        help="check every cache in a folder, for every resolution it holds",
        description="Read each cache's zip directory and npy headers (and, when asked, its data) and check "
        "it for every latents_{h}x{w} it holds, with its flipped latents and alpha mask when present.",
    )
    verify.add_argument("dir", help="the image folder")
    verify.add_argument("--recursive", "-r", action="store_true", help="also check subfolders")
    verify.add_argument("--crc", action="store_true", help="also read the data and check each CRC-32")
    verify.add_argument("--finite", action="store_true", help="also read the latents and refuse NaN or Inf")
    verify.add_argument(
        "--source", action="store_true", help="also report caches whose recorded source image changed"
    )
    verify.add_argument("--workers", type=_positive_int, default=None, help="threads (default: automatic)")
    verify.add_argument("--json", action="store_true", help="print the counts and every problem as JSON")
    verify.add_argument(
        "--suffix", default=latentcache.DEFAULT_SUFFIX, help="cache suffix (default %(default)s)"
    )
    verify.set_defaults(func=_cmd_verify)

    bench = sub.add_parser(
        "bench", help="validation and loading throughput against sd-scripts, np.load, safetensors, raw read"
    )
    bench.add_argument("dir", nargs="?", help="measure the caches in this folder instead of generated ones")
    bench.add_argument("--files", type=int, default=2000, help="files to generate (or at most to use)")
    bench.add_argument("--workers", type=int, default=2, help="threads for load_batch (default %(default)s)")
    bench.add_argument("--json", action="store_true", help="print the figures as JSON")
    bench.set_defaults(func=_cmd_bench)

    _add_encode_parser(sub)
    add_tool_parsers(sub)

    run = sub.add_parser(
        "run",
        help="run an sd-scripts training script with latentcache installed",
        description="Put SCRIPT's folder on sys.path, install latentcache into sd-scripts and run SCRIPT as "
        "__main__ with ARGS, e.g. `latentcache run anima_train_network.py --cache_latents_to_disk ...`.",
    )
    run.add_argument("script", nargs="?", help="the sd-scripts training script (e.g. anima_train_network.py)")
    run.add_argument("args", nargs=argparse.REMAINDER, help="the script's own arguments")
    run.set_defaults(func=_cmd_run)
    return parser


def _add_encode_parser(sub: Any) -> None:
    from latentcache.models import names

    enc = sub.add_parser(
        "encode",
        help="encode a folder (or an sd-scripts dataset config) to latent caches sd-scripts will reuse",
        description="Pre-cache latents without starting a training: list the images of DIR (a folder, or an "
        "sd-scripts dataset config .toml), choose each image's bucket exactly as sd-scripts does with the "
        "same options, skip the caches that are already valid, and encode the rest with the VAE. A later "
        "sd-scripts run with the same options finds every cache valid. Exit status 0 when every cache is "
        "done, 1 when some image failed, 2 for bad usage.",
    )
    enc.add_argument("dir", help="an image folder, or an sd-scripts dataset config (.toml)")
    enc.add_argument(
        "--vae",
        required=True,
        help="the VAE weights: a .safetensors (official/ComfyUI or diffusers layout) or a diffusers folder",
    )
    enc.add_argument("--model", default="anima", choices=names(), help="cache kind (default %(default)s)")
    enc.add_argument(
        "--resolution", default=None, help="'SIZE' or 'WIDTH,HEIGHT' (default 1024; a config's own wins)"
    )
    enc.add_argument("--enable_bucket", action="store_true", help="aspect-ratio buckets (sd-scripts' option)")
    enc.add_argument("--min_bucket_reso", type=int, default=256, help="smallest bucket side (default 256)")
    enc.add_argument("--max_bucket_reso", type=int, default=1024, help="largest bucket side (default 1024)")
    enc.add_argument("--bucket_reso_steps", type=int, default=64, help="bucket side step (default 64)")
    enc.add_argument(
        "--bucket_no_upscale", action="store_true", help="buckets from the image size, no upscale"
    )
    enc.add_argument("--flip_aug", action="store_true", help="also cache the horizontally flipped latents")
    enc.add_argument("--alpha_mask", action="store_true", help="also cache the alpha channel as a mask")
    enc.add_argument(
        "--batch-size", "--batch_size", dest="batch_size", type=_positive_int, default=4,
        help="images per VAE forward (default %(default)s)",
    )  # fmt: skip
    enc.add_argument(
        "--dtype", choices=("bf16", "fp16", "fp32"), default=None,
        help="VAE dtype (default bf16 on CUDA, fp32 on the CPU; use the training run's VAE dtype)",
    )  # fmt: skip
    enc.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default cuda when available)")
    enc.add_argument("--compile", action="store_true", help="torch.compile the folded encoder")
    enc.add_argument(
        "--no-fold", "--no_fold", dest="no_fold", action="store_true", help="run the stock 3-D encoder"
    )
    enc.add_argument(
        "--decode-workers", dest="decode_workers", type=_positive_int, default=None,
        help="image decode threads (default: automatic)",
    )  # fmt: skip
    enc.add_argument("--recursive", "-r", action="store_true", help="also encode the images in subfolders")
    enc.add_argument("--json", action="store_true", help="print the plan and the summary as JSON")
    enc.set_defaults(func=_cmd_encode)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "run":
        if args.script is None:
            print(
                "latentcache run: error: the training script is required (latentcache run SCRIPT [ARGS...])",
                file=sys.stderr,
            )
            return EXIT_USAGE
        if not os.path.isfile(args.script):
            print(f"latentcache run: error: no such script: {args.script}", file=sys.stderr)
            return EXIT_USAGE
        return int(args.func(args))
    try:
        return int(args.func(args))
    except (OSError, ValueError, LatentCacheError) as exc:
        print(f"latentcache {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
