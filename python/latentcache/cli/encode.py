"""``latentcache encode``: a folder or a dataset config encoded to the caches sd-scripts reuses."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from latentcache.cli.common import EXIT_OK, EXIT_PROBLEMS, positive_int, print_list

__all__ = ["add_parser", "command"]


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


def command(args: argparse.Namespace) -> int:
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
        # The model is passed only where it is not the default, so that a stand-in loader with the
        # older signature (path, device, dtype) keeps working for Anima.
        by_model = {} if schema.name == models.DEFAULT_MODEL else {"model": schema.name}
        try:
            vae = load_vae(args.vae, device=device, dtype=dtype, **by_model)
        except ImportError as e:  # the model's VAE class is missing from the installed diffusers
            raise ValueError(str(e)) from e
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
        print_list("images that cannot be read", [f"{p}: {m}" for p, m in todo.unreadable])
    return EXIT_OK if not failed and not summary.interrupted else EXIT_PROBLEMS


def add_parser(sub: Any) -> None:
    """Add ``encode`` to an argparse subparsers object."""
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
        help="the VAE weights of --model: a .safetensors file, a diffusers VAE folder (config.json + "
        "diffusion_pytorch_model.safetensors) or a model root with vae/. Single files: anima: ComfyUI "
        "qwen_image_vae.safetensors or diffusers keys; sd/sdxl: a VAE file or a full checkpoint "
        "(first_stage_model.*); flux/lumina: ae.safetensors; sd3: an SD3 checkpoint or VAE file; "
        "hunyuan_image: the original VAE file sd-scripts loads. The architecture is read from the weights",
    )
    enc.add_argument(
        "--model", default="anima", choices=names(),
        help="cache kind, as the sd-scripts training script for that model writes it: the VAE class, "
        "normalisation, cache suffix and keys (default %(default)s)",
    )  # fmt: skip
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
        "--batch-size", "--batch_size", dest="batch_size", type=positive_int, default=4,
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
        "--decode-workers", dest="decode_workers", type=positive_int, default=None,
        help="image decode threads (default: automatic)",
    )  # fmt: skip
    enc.add_argument("--recursive", "-r", action="store_true", help="also encode the images in subfolders")
    enc.add_argument("--json", action="store_true", help="print the plan and the summary as JSON")
    enc.set_defaults(func=command)
