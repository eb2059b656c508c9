"""The pipelined encoder: images to latent caches with decode, VAE and writes overlapping, memory bounded.

Stages, joined by bounded hand-offs so that memory stays flat whatever the dataset size:

1. **Decode** (``decode_workers`` threads): read, resize and crop each image exactly as sd-scripts does
   (``latentcache.encode.preprocess``), to uint8 HWC. Decodes are submitted lazily: at most
   ``queue_depth`` images are decoding or decoded and waiting for the VAE.
2. **Batching** (the calling thread): images wait per (bucket, flip, alpha, random crop); a full batch
   is taken from the bucket with most waiting images, a partial one once its bucket has nothing left
   to decode (or when the window is full), so the VAE always gets the largest batches there are.
3. **Upload**: the uint8 batch is stacked into a pinned host buffer (CUDA) and copied with
   ``non_blocking=True`` (a quarter of the bytes of sd-scripts' float32 upload), then mapped to
   [-1, 1] in the encoder's dtype on the device through a 256-entry table computed on the CPU as
   torchvision's ``ToTensor`` + ``Normalize(0.5, 0.5)`` compute it (bit-identical on every device).
4. **Encode** under ``torch.inference_mode()``; with flip augmentation the flipped pixels go through
   the same forward (two forwards after an out-of-memory error). CUDA out of memory halves the batch
   and retries it; only a single image that does not fit is fatal.
5. **Copy back** in the encoder's dtype into a pinned buffer, then a CUDA event (plain tensors on the
   CPU), so the next batch is launched while this one is still on the device; the writer waits on the
   event before it reads the buffer. All of it runs on the encoder device's current stream, under
   ``torch.cuda.device(encoder.device)``.
6. **Write** (``write_workers`` threads, at most ``2 * max(batch_size, 2 * write_workers)`` images
   queued): ``latentcache.write_latents`` (crash-safe, merges resolutions, releases the interpreter
   lock), or the caller's ``sink``.

There is no ``gc.collect()`` or ``torch.cuda.empty_cache()`` per batch (``empty_cache`` only after an
out-of-memory error). SIGINT/SIGTERM (handlers installed only when called from the main thread, and
restored afterwards) stop the run cleanly: no new batch starts, writes in flight finish, the summary
says ``interrupted``; a second signal raises ``KeyboardInterrupt``. Caches are written whole or not at
all, so a later run with ``skip_existing=True`` encodes only what is missing.
"""

from __future__ import annotations

import inspect
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from latentcache import models
from latentcache.encode.preprocess import Preprocessed, preprocess_image

__all__ = [
    "EncodeItem",
    "EncodeSummary",
    "EncodedImage",
    "as_encoder",
    "dtype_name",
    "encode_items",
    "is_oom_error",
]

logger = logging.getLogger("latentcache.encode")

_Key = tuple[tuple[int, int], bool, bool, bool]


@dataclass(frozen=True)
class EncodeItem:
    """One image to encode into one cache file.

    Attributes:
        image_path: the image file.
        cache_path: the target npz (its folder must exist).
        bucket: ``(width, height)`` in pixels, multiples of the model's stride.
        flip: also encode the horizontally flipped image (``latents_flipped``).
        alpha: keep RGBA and store the alpha channel as ``alpha_mask``.
        random_crop: crop the resized image at a random offset instead of centred.
        key: opaque, handed back to the sink (e.g. sd-scripts' ``ImageInfo``).
        resized_size: ``(width, height)`` to resize to before cropping; default the size sd-scripts'
            predefined buckets give (``preprocess.resized_size_for``). Pass sd-scripts'
            ``info.resized_size`` for no-upscale bucketing.
        resize_interpolation: sd-scripts' per-subset ``resize_interpolation`` (``"lanczos"``,
            ``"area"``, ...); None for its default (area down, Lanczos up).
    """

    image_path: str
    cache_path: str
    bucket: tuple[int, int]
    flip: bool = False
    alpha: bool = False
    random_crop: bool = False
    key: object = None
    resized_size: tuple[int, int] | None = None
    resize_interpolation: str | None = None


@dataclass
class EncodedImage:
    """What the VAE made of one image, as handed to a sink (or written).

    Attributes:
        item: the ``EncodeItem``.
        latents: float32 ``(C, h, w)``, normalised as the model's caches store them.
        latents_flipped: float32 ``(C, h, w)`` of the flipped image, or None.
        original_size: ``(W, H)`` of the image before resizing.
        crop_ltrb: ``(L, T, R, B)`` in bucket pixels.
        alpha_mask: float32 ``(H, W)`` in [0, 1], or None.
    """

    item: EncodeItem
    latents: np.ndarray
    latents_flipped: np.ndarray | None
    original_size: tuple[int, int]
    crop_ltrb: tuple[float, float, float, float]
    alpha_mask: np.ndarray | None


@dataclass
class EncodeSummary:
    """What an ``encode_items`` run did (all ranks together after a distributed run).

    Attributes:
        total: items given (after sharding: this rank's, before the reduction).
        encoded: caches written (or images handed to the sink).
        skipped: items whose cache was already valid (``skip_existing``).
        failed: images that could not be read, decoded, encoded or written.
        failures: ``(image path, message)`` per failed image.
        wall_s: wall time of the run.
        vae_s: time inside the VAE forward (device time measured with CUDA events on CUDA).
        batches: VAE forwards.
        oom_retries: out-of-memory errors that were retried with a smaller batch.
        interrupted: stopped early by SIGINT/SIGTERM.
        peaks: the most images each bounded stage held at once (``decode``, ``write``).
        bounds: the bound of each stage.
        world_size: processes that took part.
    """

    total: int = 0
    encoded: int = 0
    skipped: int = 0
    failed: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    wall_s: float = 0.0
    vae_s: float = 0.0
    batches: int = 0
    oom_retries: int = 0
    interrupted: bool = False
    peaks: dict[str, int] = field(default_factory=dict)
    bounds: dict[str, int] = field(default_factory=dict)
    world_size: int = 1

    @property
    def vae_busy(self) -> float:
        """Share of the wall time spent inside the VAE forward (0 when nothing ran)."""
        return self.vae_s / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def images_per_s(self) -> float:
        """Images encoded per second of wall time."""
        return self.encoded / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def missing(self) -> int:
        """Items neither encoded, skipped nor failed (left by an interruption)."""
        return max(0, self.total - self.encoded - self.skipped - self.failed)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field, plus ``vae_busy``, ``images_per_s`` and ``missing``."""
        d = asdict(self)
        d["failures"] = [list(f) for f in self.failures]
        d["vae_busy"] = self.vae_busy
        d["images_per_s"] = self.images_per_s
        d["missing"] = self.missing
        return d

    def format(self, max_failures: int = 20) -> str:
        """The human summary: counts, wall time, images/s, how busy the VAE was, and each failure."""
        ranks = f" on {self.world_size} processes" if self.world_size > 1 else ""
        lines = [
            f"latentcache encode: {self.encoded} encoded, {self.skipped} skipped (valid), "
            f"{self.failed} failed of {self.total}{ranks} in {_fmt_s(self.wall_s)} "
            f"({self.images_per_s:.1f} images/s); VAE busy {100 * self.vae_busy:.0f}% of the wall time "
            f"({self.batches} batches"
            + (f", {self.oom_retries} out-of-memory retries" if self.oom_retries else "")
            + ")"
        ]
        if self.vae_s > 0 and self.vae_busy < 0.7 and self.encoded:
            lines.append("  the VAE waited for images: more decode workers or a faster disk would help")
        for path, msg in self.failures[:max_failures]:
            lines.append(f"  failed: {path}: {msg}")
        if len(self.failures) > max_failures:
            lines.append(f"  ... and {len(self.failures) - max_failures} more failures")
        if self.interrupted:
            lines.append(
                f"  interrupted: {self.missing} images not encoded; the caches written are complete, and "
                "a new run encodes only what is missing"
            )
        return "\n".join(lines)


def _fmt_s(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    m, s = divmod(int(s + 0.5), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def is_oom_error(e: BaseException) -> bool:
    """Whether ``e`` is a device out-of-memory error (``torch.cuda.OutOfMemoryError`` or its message)."""
    import torch

    oom_types = tuple(
        t
        for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None))
        if isinstance(t, type)
    )
    if oom_types and isinstance(e, oom_types):
        return True
    # cuBLAS/cuDNN report an allocation that failed inside the library as a plain RuntimeError.
    text = str(e)
    return isinstance(e, RuntimeError) and (
        "out of memory" in text.lower()
        or "CUBLAS_STATUS_ALLOC_FAILED" in text
        or "CUDNN_STATUS_ALLOC_FAILED" in text
    )


def dtype_name(dtype: Any) -> str:
    """``"bf16"``, ``"fp16"`` or ``"fp32"`` for a torch dtype (else its name)."""
    import torch

    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(
        dtype, str(dtype).replace("torch.", "")
    )


class _VaeEncoder:
    """A raw VAE (sd-scripts' or diffusers' Qwen-Image class) behind the ``Encoder`` interface."""

    folded = False
    fingerprint: str | None = None

    def __init__(self, vae: Any, channels: int, stride: int) -> None:
        from latentcache.encode.vae import vae_device_dtype

        self.vae = vae
        self.device, self.dtype = vae_device_dtype(vae)
        self.channels = channels
        self.stride = stride

    def __call__(self, pixels: Any) -> Any:
        from latentcache.encode.vae import encode_pixels

        return encode_pixels(self.vae, pixels)


def torch_device(device: Any) -> Any:
    """``device`` as a ``torch.device``."""
    import torch

    return torch.device(device)


def as_encoder(obj: Any, model: models.ModelLike = "anima") -> Any:
    """``obj`` when it is an ``Encoder`` (callable with ``device``, ``dtype`` and ``fingerprint``),
    else a raw Qwen-Image VAE wrapped as one (no fingerprint; ``build_encoder`` makes a better one)."""
    if callable(obj) and all(hasattr(obj, a) for a in ("device", "dtype", "fingerprint")):
        return obj
    schema = models.get(model)
    return _VaeEncoder(obj, schema.channels, schema.stride)


def unit_range_lut(dtype: Any, device: Any = "cpu") -> Any:
    """The 256 values uint8 pixels scale to, in ``dtype`` on ``device``: ``v / 255``, ``- 0.5``, ``/ 0.5``.

    Computed on the CPU in float32 with exactly torchvision's ``ToTensor`` + ``Normalize([0.5], [0.5])``
    operations (what sd-scripts applies), then cast to ``dtype`` as sd-scripts' ``.to(device, dtype)``
    does. Looking the pixels up keeps them bit-identical on every device: CUDA computes a division by a
    Python scalar as a multiplication by its reciprocal, which is one float32 ulp off ``v / 255`` for
    126 of the 256 values.
    """
    import torch

    lut = torch.arange(256, dtype=torch.float32).div(255.0).sub(0.5).div(0.5)
    return lut.to(dtype).to(device)


def to_unit_range(x: Any, lut: Any) -> Any:
    """uint8 ``(B, H, W, 3)`` pixels -> ``(B, 3, H, W)`` contiguous, in [-1, 1], in ``lut``'s dtype (on
    ``x``'s device, which must be ``lut``'s), each value looked up in ``unit_range_lut``."""
    import torch

    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[3] != 3:
        raise ValueError(f"expected uint8 (B, H, W, 3) pixels, got {x.dtype} {tuple(x.shape)}")
    b, h, w, _ = x.shape
    # int32 indices: a uint8 index tensor would be taken as a boolean mask.
    vals = lut.index_select(0, x.reshape(-1).to(torch.int32))
    return vals.view(b, h, w, 3).permute(0, 3, 1, 2).contiguous()


def to_pinned(t: Any) -> Any:
    """A device tensor's copy in freshly allocated pinned host memory, in its own dtype, queued on the
    device's current stream with ``non_blocking=True``: not readable until an event recorded after it has
    completed. The block comes from torch's caching host allocator, which does not hand it out again
    until this copy is done."""
    import torch

    dst = torch.empty(tuple(t.shape), dtype=t.dtype, pin_memory=True)
    dst.copy_(t, non_blocking=True)
    return dst


@dataclass
class _Decoded:
    item: EncodeItem
    pre: Preprocessed | None = None
    source: dict[str, Any] | None = None
    error: str | None = None


@dataclass
class _Batch:
    """A batch whose latents are on their way back from the device."""

    decoded: list[_Decoded]
    latents: Any
    flipped: Any
    event: Any = None
    timing: tuple[Any, Any] | None = None


def _default_workers(world: int, device: Any) -> int:
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0) or world
    cores = max(1, (os.cpu_count() or 1) // max(1, local))
    if getattr(device, "type", str(device)) == "cpu":
        import torch

        # A CPU VAE runs on torch's intra-op threads: decode on the cores it leaves free (at least one).
        return max(1, min(8, cores - torch.get_num_threads()))
    return max(1, min(8, cores))


class _SingleThreadedOpenCV:
    """OpenCV resizes on one thread while the run is on (the decode workers are the parallelism; its own
    pool beside them and the VAE only oversubscribes the cores); the previous setting is restored."""

    def __enter__(self) -> None:
        self.previous: int | None = None
        try:
            import cv2  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            return
        self.previous = int(cv2.getNumThreads())
        cv2.setNumThreads(1)

    def __exit__(self, *exc: Any) -> None:
        if self.previous is not None:
            import cv2  # type: ignore[import-not-found,unused-ignore]

            cv2.setNumThreads(self.previous)


def _on_device(device: Any) -> Any:
    """``torch.cuda.device(device)`` for a CUDA device (the run's kernels, streams and events then belong
    to the encoder's GPU even when the process's current device is another one), else a no-op."""
    import contextlib

    import torch

    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class _Pipeline:
    """One run of ``encode_items`` (the state the stages share)."""

    def __init__(
        self,
        items: Sequence[EncodeItem],
        encoder: Any,
        schema: models.ModelSchema,
        *,
        batch_size: int,
        decode_workers: int,
        write_workers: int,
        queue_depth: int,
        sink: Callable[[EncodedImage], Any] | None,
        meta: dict[str, Any],
        record_source: bool,
        progress: bool,
        durable: bool,
        summary: EncodeSummary,
        log_every_s: float,
    ) -> None:
        import torch

        self.torch = torch
        self.items = items
        self.encoder = encoder
        self.schema = schema
        self.batch_size = batch_size
        self.cap = batch_size  # lowered for good after an out-of-memory error
        self.split_flip = False  # flip in its own forward after an out-of-memory error
        self.decode_workers = decode_workers
        self.write_workers = write_workers
        self.window = queue_depth
        self.write_bound = 2 * max(batch_size, 2 * write_workers)
        self.sink = sink
        self.meta = meta
        self.record_source = record_source
        self.durable = durable
        self.summary = summary
        self.device = torch.device(encoder.device)
        self.dtype = encoder.dtype
        self.cuda = self.device.type == "cuda"
        if self.cuda and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.lut = unit_range_lut(self.dtype, self.device)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.write_slots = threading.Semaphore(self.write_bound)
        self.write_held = 0
        self.decode_held = 0
        self.cuda_timings: list[tuple[Any, Any]] = []
        self.done = 0
        self.t0 = time.perf_counter()
        self.bar: Any = None
        self.progress = progress
        self.log_every_s = log_every_s
        summary.bounds = {"decode": self.window, "write": self.write_bound}
        summary.peaks = {"decode": 0, "write": 0}

    # -- progress ---------------------------------------------------------------------------------

    def _start_progress(self, total: int) -> threading.Thread | None:
        if not self.progress:
            return None
        if sys.stderr is not None and sys.stderr.isatty():
            try:
                from tqdm import tqdm  # type: ignore[import-untyped,unused-ignore]

                self.bar = tqdm(total=total, unit="img", desc="latentcache encode", file=sys.stderr)
                return None
            except ImportError:
                pass
        t = threading.Thread(target=self._log_loop, args=(total,), name="latentcache-progress", daemon=True)
        t.start()
        return t

    def _log_loop(self, total: int) -> None:
        while not self.finished.wait(self.log_every_s):
            logger.info(self._progress_line(total))

    def _progress_line(self, total: int) -> str:
        elapsed = time.perf_counter() - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = _fmt_s((total - self.done) / rate) if rate > 0 else "?"
        busy = self.summary.vae_s / elapsed if elapsed > 0 and not self.cuda else None
        vae = f"{self.summary.batches} batches" + (f", busy {100 * busy:.0f}%" if busy is not None else "")
        return (
            f"latentcache encode: {self.done}/{total} images ({rate:.1f}/s, ETA {eta}) | "
            f"decode: {self.decode_held}/{self.window} held, {self.decode_workers} workers | "
            f"vae: {vae} | write: {self.write_held}/{self.write_bound} queued, {self.summary.failed} failed"
        )

    def _advance(self, n: int = 1) -> None:
        with self.lock:
            self.done += n
        if self.bar is not None:
            self.bar.update(n)

    def _fail(self, path: str, message: str) -> None:
        logger.warning("latentcache encode: %s: %s", path, message)
        with self.lock:
            self.summary.failed += 1
            self.summary.failures.append((path, message))
        self._advance()

    # -- decode -----------------------------------------------------------------------------------

    def _decode(self, item: EncodeItem) -> _Decoded:
        if self.stop.is_set():
            return _Decoded(item, error="interrupted")
        try:
            source = None
            if self.record_source:
                from latentcache.cache.meta import source_fingerprint

                # Taken before decoding: an image changed in between then reads as stale next time.
                source = source_fingerprint(item.image_path)
            pre = preprocess_image(
                item.image_path,
                item.bucket,
                alpha=item.alpha,
                random_crop=item.random_crop,
                resized_size=item.resized_size,
                interpolation=item.resize_interpolation,
            )
            return _Decoded(item, pre, source)
        except Exception as e:  # noqa: BLE001 - an unreadable image is reported, never fatal
            return _Decoded(item, error=f"cannot read the image: {type(e).__name__}: {e}")

    # -- the main loop ----------------------------------------------------------------------------

    def run(self) -> None:
        items = self.items
        key_of: Callable[[EncodeItem], _Key] = lambda it: (  # noqa: E731
            (int(it.bucket[0]), int(it.bucket[1])),
            bool(it.flip),
            bool(it.alpha),
            bool(it.random_crop),
        )
        # sd-scripts' order (by bucket area) keeps each bucket's images together, so batches fill.
        order = sorted(
            range(len(items)), key=lambda i: (items[i].bucket[0] * items[i].bucket[1], key_of(items[i]))
        )
        undecoded: dict[_Key, int] = {}
        for it in items:
            undecoded[key_of(it)] = undecoded.get(key_of(it), 0) + 1
        waiting: dict[_Key, deque[_Decoded]] = {}
        inflight: set[Future[_Decoded]] = set()
        stream: Iterator[int] = iter(order)
        more = True
        self.finished = threading.Event()
        logger_thread = self._start_progress(len(items))
        decoders = ThreadPoolExecutor(self.decode_workers, thread_name_prefix="latentcache-decode")
        self.writers = ThreadPoolExecutor(self.write_workers, thread_name_prefix="latentcache-write")
        try:
            while not self.stop.is_set():
                while more and self.decode_held < self.window:
                    i = next(stream, None)
                    if i is None:
                        more = False
                        break
                    inflight.add(decoders.submit(self._decode, items[i]))
                    self._held(+1)
                # A partial batch only when the window is full of decoded images: nothing in flight
                # could complete a batch, and nothing more may be decoded.
                key = self._pick(waiting, undecoded, full=self.decode_held >= self.window and not inflight)
                if key is not None:
                    queue = waiting[key]
                    batch = [queue.popleft() for _ in range(min(self.batch_size, len(queue)))]
                    if not queue:
                        del waiting[key]
                    self._encode_batch(key, batch)
                    self._held(-len(batch))
                    continue
                if not inflight:
                    break
                done, inflight = wait(inflight, timeout=0.5, return_when=FIRST_COMPLETED)
                for f in done:
                    d = f.result()
                    k = key_of(d.item)
                    undecoded[k] -= 1
                    if d.error is not None:
                        self._held(-1)
                        if d.error != "interrupted":
                            self._fail(d.item.image_path, d.error)
                    else:
                        waiting.setdefault(k, deque()).append(d)
        finally:
            if self.stop.is_set():
                self.summary.interrupted = True
            for f in inflight:
                f.cancel()
            decoders.shutdown(wait=True, cancel_futures=True)
            self.writers.shutdown(wait=True)
            self._collect_cuda_timings(final=True)
            self.finished.set()
            if logger_thread is not None:
                logger_thread.join()
            if self.bar is not None:
                self.bar.close()

    def _held(self, n: int) -> None:
        with self.lock:
            self.decode_held += n
            if self.decode_held > self.summary.peaks["decode"]:
                self.summary.peaks["decode"] = self.decode_held

    def _pick(
        self, waiting: dict[_Key, deque[_Decoded]], undecoded: dict[_Key, int], full: bool
    ) -> _Key | None:
        """The bucket to encode next: the one with most waiting images among those with a full batch;
        else one whose images are all decoded (a final partial batch); else, when the decode window
        is full, the one with most waiting images."""
        if not waiting:
            return None
        best = max(waiting, key=lambda k: len(waiting[k]))
        if len(waiting[best]) >= self.batch_size:
            return best
        finished = [k for k in waiting if undecoded[k] == 0]
        if finished:
            return max(finished, key=lambda k: len(waiting[k]))
        return best if full else None

    # -- upload, encode, copy back ----------------------------------------------------------------

    def _upload(self, decoded: list[_Decoded]) -> Any:
        torch = self.torch
        first = decoded[0].pre
        assert first is not None
        h, w = first.pixels.shape[:2]
        # A fresh block from torch's caching host allocator: it hands out a pinned block again only once
        # the copies recorded on it are done, so filling it cannot race an earlier batch's upload.
        host = torch.empty((len(decoded), h, w, 3), dtype=torch.uint8, pin_memory=self.cuda)
        view = host.numpy()
        for i, d in enumerate(decoded):
            assert d.pre is not None
            view[i] = d.pre.pixels
        # Asynchronous from pinned memory; ordered before the forward by the device's current stream.
        x = host.to(self.device, non_blocking=True) if self.cuda else host
        return to_unit_range(x, self.lut)

    def _stream(self) -> Any:
        """The stream the upload, the forward and the copy back run on (the encoder device's current one)."""
        return self.torch.cuda.current_stream(self.device)

    def _forward(self, x: Any) -> Any:
        torch = self.torch
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            # Recorded on the encoder device's stream (not the current device's): they bracket the forward.
            start.record(self._stream())
            with torch.inference_mode():
                out = self.encoder(x)
            end.record(self._stream())
            with self.lock:
                self.cuda_timings.append((start, end))
        else:
            t = time.perf_counter()
            with torch.inference_mode():
                out = self.encoder(x)
            with self.lock:
                self.summary.vae_s += time.perf_counter() - t
        with self.lock:
            self.summary.batches += 1
        if out.ndim == 5 and out.shape[2] == 1:
            out = out.squeeze(2)
        return out

    def _collect_cuda_timings(self, final: bool = False) -> None:
        if not self.cuda:
            return
        with self.lock:
            timings, self.cuda_timings = self.cuda_timings, []
        keep = []
        for start, end in timings:
            if final:
                end.synchronize()
            if end.query():
                with self.lock:
                    self.summary.vae_s += start.elapsed_time(end) / 1000.0
            else:
                keep.append((start, end))
        with self.lock:
            self.cuda_timings.extend(keep)

    def _encode_batch(self, key: _Key, batch: list[_Decoded]) -> None:
        lo = 0
        while lo < len(batch):
            # The cap can drop while this batch is encoded: what is left is chunked with the new one.
            n = self.cap
            self._encode_chunk(key, batch[lo : lo + n])
            lo += n

    def _attempt(self, chunk: list[_Decoded], flip: bool) -> tuple[Any, Any]:
        """Upload and encode one chunk: ``(latents, flipped latents or None)`` on the device."""
        x = self._upload(chunk)
        if flip and not self.split_flip:
            out = self._forward(self.torch.cat([x, x.flip(3)]))
            return out[: len(chunk)], out[len(chunk) :]
        return self._forward(x), self._forward(x.flip(3)) if flip else None

    def _encode_chunk(self, key: _Key, chunk: list[_Decoded]) -> None:
        torch = self.torch
        flip = key[1]
        stride = self.schema.stride
        bw, bh = key[0]
        expect = (len(chunk), self.schema.channels, bh // stride, bw // stride)
        error: BaseException | None = None
        try:
            lat, lat_f = self._attempt(chunk, flip)
        except Exception as e:  # noqa: BLE001 - only out-of-memory is retried; the rest re-raised
            if not is_oom_error(e):
                raise
            error = e
        if error is not None:
            # Retried outside the except block, so the failed attempt's tensors (held by the
            # traceback) are freed first.
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            # The failed attempt's pixels and activations live only in _attempt's frame, which the
            # traceback holds: dropping it frees them before the retries upload their own.
            del error
            if self.cuda:
                torch.cuda.empty_cache()
            with self.lock:
                self.summary.oom_retries += 1
            if flip and not self.split_flip:
                logger.warning(
                    "latentcache encode: out of memory encoding %d images with their flips in one forward; "
                    "encoding the flips separately from now on (%s)", len(chunk), message,
                )  # fmt: skip
                self.split_flip = True
                self._encode_chunk(key, chunk)
                return
            if len(chunk) == 1:
                raise RuntimeError(
                    f"latentcache encode: out of memory encoding a single {bw}x{bh} image "
                    f"({chunk[0].item.image_path}): {message}"
                )
            self.cap = max(1, len(chunk) // 2)
            logger.warning(
                "latentcache encode: out of memory with a batch of %d; retrying with batches of %d (%s)",
                len(chunk), self.cap, message,
            )  # fmt: skip
            for lo in range(0, len(chunk), self.cap):
                self._encode_chunk(key, chunk[lo : lo + self.cap])
            return
        if tuple(lat.shape) != expect:
            raise RuntimeError(
                f"latentcache encode: the encoder returned latents of shape {tuple(lat.shape)} for a "
                f"{bw}x{bh} batch of {len(chunk)}; the {self.schema.name} model expects {expect}"
            )
        self._copy_back(chunk, lat, lat_f)

    def _copy_back(self, chunk: list[_Decoded], lat: Any, lat_f: Any) -> None:
        torch = self.torch
        event = None
        if self.cuda:
            lat = to_pinned(lat)
            lat_f = None if lat_f is None else to_pinned(lat_f)
            # Recorded after both copies on their stream: once it completes, the pinned buffers hold the
            # latents (the writer waits on it before reading them; the CPU never reads them earlier).
            event = torch.cuda.Event()
            event.record(self._stream())
        else:
            lat = lat.contiguous()
            lat_f = None if lat_f is None else lat_f.contiguous()
        for _ in chunk:
            self.write_slots.acquire()  # backpressure: at most write_bound images queued
        with self.lock:
            self.write_held += len(chunk)
            self.summary.peaks["write"] = max(self.summary.peaks["write"], self.write_held)
        self.writers.submit(self._write_batch, _Batch(chunk, lat, lat_f, event))
        self._collect_cuda_timings()

    # -- write ------------------------------------------------------------------------------------

    def _write_batch(self, batch: _Batch) -> None:
        released = 0
        try:
            if batch.event is not None:
                batch.event.synchronize()  # the device-to-host copies into the pinned buffers are done
            # float32 on the CPU (exact from bf16/fp16), after the wait: never reads a buffer in flight.
            lat = batch.latents.float().numpy()
            lat_f = None if batch.flipped is None else batch.flipped.float().numpy()
            for i, d in enumerate(batch.decoded):
                try:
                    self._write_one(d, lat[i], None if lat_f is None else lat_f[i])
                finally:
                    released += 1
                    self._release_write(1)
        except BaseException as e:
            for d in batch.decoded[released:]:
                self._fail(d.item.image_path, f"the writer failed: {type(e).__name__}: {e}")
            raise
        finally:
            self._release_write(len(batch.decoded) - released)

    def _release_write(self, n: int) -> None:
        if n <= 0:
            return
        with self.lock:
            self.write_held -= n
        for _ in range(n):
            self.write_slots.release()

    def _write_one(self, d: _Decoded, lat: np.ndarray, lat_f: np.ndarray | None) -> None:
        pre = d.pre
        assert pre is not None
        item = d.item
        try:
            if self.sink is not None:
                # Own copies: a view would keep the whole (pinned) batch buffer alive in memory caches.
                if not np.isfinite(lat).all() or (lat_f is not None and not np.isfinite(lat_f).all()):
                    raise ValueError(f"{item.cache_path}: the VAE gave NaN or Inf latents")
                self.sink(
                    EncodedImage(
                        item=item,
                        latents=np.array(lat),
                        latents_flipped=None if lat_f is None else np.array(lat_f),
                        original_size=pre.original_size,
                        crop_ltrb=pre.crop_ltrb,
                        alpha_mask=pre.alpha_mask,
                    )
                )
            else:
                from latentcache.cache.write import write_latents

                meta = dict(self.meta)
                if d.source is not None:
                    meta["source"] = d.source
                write_latents(
                    item.cache_path,
                    latents=lat,
                    original_size=np.asarray(pre.original_size),
                    crop_ltrb=np.asarray(pre.crop_ltrb),
                    latents_flipped=lat_f,
                    alpha_mask=pre.alpha_mask,
                    meta=meta,
                    durable=self.durable,
                    model=self.schema,
                )
        except Exception as e:  # noqa: BLE001 - NaN/Inf latents, a full disk: counted, never fatal
            self._fail(item.image_path, f"{type(e).__name__}: {e}")
            return
        with self.lock:
            self.summary.encoded += 1
        self._advance()


class _Signals:
    """SIGINT/SIGTERM set ``stop`` (the first time) while the run is on; installed only in the main thread."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    self.previous[sig] = signal.signal(sig, self._handle)
                except (ValueError, OSError):
                    pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.stop.is_set():
            raise KeyboardInterrupt
        self.stop.set()
        logger.warning(
            "latentcache encode: %s: stopping after the writes in flight (send it again to abort now)",
            signal.Signals(signum).name,
        )

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _skip_valid(
    items: Sequence[EncodeItem], schema: models.ModelSchema, fingerprint: str | None, summary: EncodeSummary
) -> list[EncodeItem]:
    from latentcache.cache.validate import validate

    if not items:
        return []
    kwargs: dict[str, Any] = {"check_source": True, "suffix": schema.suffix, "model": schema}
    if fingerprint is not None and "vae" in inspect.signature(validate).parameters:
        kwargs["vae"] = fingerprint
    statuses = validate(
        [it.cache_path for it in items],
        [(int(it.bucket[0]), int(it.bucket[1])) for it in items],
        flipped=[bool(it.flip) for it in items],
        alpha_mask=[bool(it.alpha) for it in items],
        **kwargs,
    )
    todo = []
    for it, st in zip(items, statuses, strict=True):
        if st.ok:
            summary.skipped += 1
        else:
            if st.code != "missing":
                logger.info("latentcache encode: %s; encoding it again", st.message)
            todo.append(it)
    return todo


def encode_items(
    items: Sequence[EncodeItem],
    encoder: Any,
    *,
    model: models.ModelLike = "anima",
    batch_size: int = 4,
    decode_workers: int | None = None,
    write_workers: int = 2,
    queue_depth: int | None = None,
    sink: Callable[[EncodedImage], Any] | None = None,
    meta: dict[str, Any] | None = None,
    progress: bool = True,
    durable: bool = True,
    distributed: bool | None = None,
    skip_existing: bool = False,
    record_source: bool = True,
    log_every_s: float = 10.0,
) -> EncodeSummary:
    """Encode images to latent caches with decoding, the VAE and writing overlapping (see the module doc).

    Args:
        items: the images, each with its cache path and bucket; the order does not matter (they are
            encoded grouped by bucket, by area as sd-scripts does).
        encoder: an ``Encoder`` (``latentcache.encode.build_encoder``): called with ``(B, 3, H, W)``
            pixels in [-1, 1] on its ``device`` in its ``dtype``, returns normalised latents
            ``(B, C, H/stride, W/stride)``. A raw Qwen-Image VAE is wrapped (``as_encoder``).
        model: the model schema (name or ``ModelSchema``): channels, stride and cache suffix.
        batch_size: images per VAE forward (flips ride in the same forward, so up to twice as many).
        decode_workers: decode threads; default ``min(8, cores)`` for a GPU encoder, and the cores
            torch's intra-op threads leave free (at least 1) for a CPU one, cores being
            ``cpu_count / processes per node``.
        write_workers: writer threads.
        queue_depth: images decoding or decoded ahead of the VAE; default
            ``max(2 * batch_size, 4 * decode_workers)``.
        sink: called with each ``EncodedImage`` (from a writer thread) instead of writing its cache
            (memory caching). With a sink, ``distributed=None`` does not shard: every process gets
            every image.
        meta: extra ``latentcache_meta`` keys for every cache; ``vae`` (the encoder's fingerprint) and
            ``vae_dtype`` are added, and ``source`` per image with ``record_source``.
        progress: tqdm on stderr when it is a terminal, else a log line every ``log_every_s``.
        durable: fsync each cache (``write_latents``).
        distributed: shard the items over ``torch.distributed`` ranks by cache path and reduce the
            summary: None = when a process group is initialised (and there is no sink), True = always
            (raises without a process group), False = never.
        skip_existing: validate each cache first (``check_source``, and the VAE fingerprint when
            ``validate`` takes one) and skip the valid ones (counted as ``skipped``).
        record_source: record each image's ``source_fingerprint`` in its cache.
        log_every_s: seconds between progress log lines when stderr is not a terminal.

    Returns:
        The ``EncodeSummary`` (on every rank, for all ranks together, after a distributed run).

    Raises:
        RuntimeError: a single image does not fit in device memory, or the encoder gives latents of
            the wrong shape; other encoder errors propagate. Unreadable images and failed writes
            are counted in the summary, not raised.
    """
    from latentcache.encode import distributed as dist_mod

    t0 = time.perf_counter()
    schema = models.get(model)
    enc = as_encoder(encoder, schema)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    for it in items:
        if it.bucket[0] % schema.stride or it.bucket[1] % schema.stride or min(it.bucket) <= 0:
            raise ValueError(
                f"{it.image_path}: bucket {it.bucket[0]}x{it.bucket[1]} is not a positive multiple of "
                f"the {schema.name} stride {schema.stride}"
            )
    shard = dist_mod.resolve(distributed, sink is not None)
    world = 1
    if shard is not None:
        rank, world = shard
        items = dist_mod.shard_items(items, rank, world)
    summary = EncodeSummary(total=len(items), world_size=world)
    full_meta: dict[str, Any] = {}
    if getattr(enc, "fingerprint", None) is not None:
        full_meta["vae"] = enc.fingerprint
    full_meta["vae_dtype"] = dtype_name(enc.dtype)
    full_meta.update(meta or {})
    todo = (
        _skip_valid(items, schema, getattr(enc, "fingerprint", None), summary)
        if skip_existing
        else list(items)
    )
    workers = decode_workers if decode_workers else _default_workers(world, torch_device(enc.device))
    depth = queue_depth if queue_depth else max(2 * batch_size, 4 * workers)
    pipe = _Pipeline(
        todo,
        enc,
        schema,
        batch_size=batch_size,
        decode_workers=workers,
        write_workers=max(1, write_workers),
        queue_depth=max(1, depth),
        sink=sink,
        meta=full_meta,
        record_source=record_source and sink is None,
        progress=progress,
        durable=durable,
        summary=summary,
        log_every_s=log_every_s,
    )
    try:
        with _Signals(pipe.stop), _SingleThreadedOpenCV(), _on_device(pipe.device):
            pipe.run()
    finally:
        summary.wall_s = time.perf_counter() - t0
    if shard is not None:
        summary = dist_mod.reduce_summary(summary)
    if progress:
        logger.info("%s", summary.format())
    return summary
