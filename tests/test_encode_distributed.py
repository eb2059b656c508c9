"""``encode_items`` on two processes (gloo, CPU): every image once, no file written twice, the same caches.

A driver script spawns two ranks with ``torch.multiprocessing``; each builds the same tiny random
Qwen-Image VAE, encodes its share (``distributed=None`` finds the process group) through a sink that
writes the cache and logs the path to a per-rank file, so a second write of any file is seen. The
caches are then compared with those of a one-process run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import latentcache as lc
import numpy as np
import pytest

torch = pytest.importorskip("torch")
PIL_Image = pytest.importorskip("PIL.Image")
pytest.importorskip("diffusers")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

DRIVER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp


    def encoder():
        from diffusers import AutoencoderKLQwenImage
        from latentcache.encode.encoders import build_encoder

        torch.manual_seed(0)
        vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1).eval()
        return build_encoder(vae, "anima")


    def items(spec):
        from latentcache.encode.pipeline import EncodeItem

        return [EncodeItem(p, c, tuple(b), flip=f) for p, c, b, f in json.load(open(spec))]


    def rank_main(rank, world, spec, out, port, mode):
        import latentcache as lc
        import numpy as np
        from latentcache.encode.pipeline import encode_items

        import datetime, time

        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        if mode == "late":
            # A group timeout shorter than rank 1's lateness: a collective at the end would time out.
            short = datetime.timedelta(seconds=10)
            dist.init_process_group("gloo", rank=rank, world_size=world, timeout=short)
            if rank == 1:
                time.sleep(16)
        else:
            dist.init_process_group("gloo", rank=rank, world_size=world)
        log = open(os.path.join(out, f"rank{rank}.log"), "w")

        def sink(e):
            lc.write_latents(
                e.item.cache_path, latents=e.latents, original_size=np.asarray(e.original_size),
                crop_ltrb=np.asarray(e.crop_ltrb), latents_flipped=e.latents_flipped, meta={"rank": rank},
            )
            log.write(e.item.cache_path + "\\n")
            log.flush()

        if mode == "sink":
            s = encode_items(items(spec), encoder(), batch_size=2, decode_workers=1, sink=sink,
                             distributed=True, progress=False)
        else:  # the default writer; sharding found from the process group
            s = encode_items(items(spec), encoder(), batch_size=2, decode_workers=1, meta={"rank": rank},
                             progress=False)
        with open(os.path.join(out, f"summary{rank}.json"), "w") as f:
            json.dump(s.as_dict(), f)
        dist.destroy_process_group()


    if __name__ == "__main__":
        spec, out, port, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
        mp.spawn(rank_main, args=(2, spec, out, port, mode), nprocs=2, join=True)
    """
)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_items(folder: Path, n: int) -> list[list]:
    rng = np.random.default_rng(1)
    rows = []
    for i in range(n):
        w, h = int(rng.integers(50, 140)), int(rng.integers(50, 140))
        p = folder / f"im{i:02d}.{'jpg' if i % 3 == 0 else 'png'}"
        PIL_Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        bucket = [(64, 64), (96, 64), (64, 96)][i % 3]
        rows.append([str(p), lc.cache_path(str(p), (w, h)), list(bucket), i % 2 == 0])
    return rows


@pytest.mark.parametrize("mode", ["sink", "write", "late"])
def test_two_ranks_encode_every_image_once_and_match_one_process(tmp_path: Path, mode: str) -> None:
    from diffusers import AutoencoderKLQwenImage
    from latentcache.encode import distributed
    from latentcache.encode.encoders import build_encoder
    from latentcache.encode.pipeline import EncodeItem, encode_items

    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir()
    one.mkdir()
    rows = make_items(two, 12)
    spec = tmp_path / "items.json"
    spec.write_text(json.dumps(rows))
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    r = subprocess.run(
        [sys.executable, str(driver), str(spec), str(tmp_path), str(free_port()), mode],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]

    summaries = [json.loads((tmp_path / f"summary{rank}.json").read_text()) for rank in (0, 1)]
    for s in summaries:  # reduced: every rank sees the whole run, 12 writes in all for 12 files
        assert (s["total"], s["encoded"], s["failed"], s["world_size"]) == (12, 12, 0, 2)
    if mode == "sink":
        written = {rank: (tmp_path / f"rank{rank}.log").read_text().split() for rank in (0, 1)}
        every = written[0] + written[1]
        assert sorted(every) == sorted(row[1] for row in rows)  # every image once, no file twice
        assert written[0] and written[1]
    for row in rows:  # each file was written by its owner only
        assert lc.read_meta(row[1])["rank"] == distributed.owner_rank(row[1], 2)  # type: ignore[index]
    assert {distributed.owner_rank(row[1], 2) for row in rows} == {0, 1}

    items = [EncodeItem(p, c, tuple(b), flip=f) for p, c, b, f in rows]
    statuses = lc.validate([it.cache_path for it in items], [it.bucket for it in items],
                           flipped=[it.flip for it in items])  # fmt: skip
    assert {s.code for s in statuses} == {"ok"}

    # One process, same weights: the same latents (each rank batched differently, so fp32 tolerance).
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1).eval()
    single = [
        EncodeItem(it.image_path, str(one / Path(it.cache_path).name), it.bucket, flip=it.flip)
        for it in items
    ]
    s = encode_items(single, build_encoder(vae, "anima"), batch_size=2, progress=False, distributed=False)
    assert s.encoded == 12
    for a, b in zip(items, single, strict=True):
        with np.load(a.cache_path) as za, np.load(b.cache_path) as zb:
            keys = [k for k in za.files if k != "latentcache_meta"]
            assert keys == [k for k in zb.files if k != "latentcache_meta"]
            for k in keys:
                np.testing.assert_allclose(za[k], zb[k], rtol=0, atol=1e-5, err_msg=f"{a.cache_path} {k}")


def test_exchange_waits_for_the_slowest_rank_and_rank_0_reads_last(monkeypatch: pytest.MonkeyPatch) -> None:
    """``exchange`` through a store, three ranks as threads: every rank gets every payload in rank order;
    rank 0 returns only after the others have read (the store may die with rank 0's process)."""
    import threading
    import time
    from types import SimpleNamespace

    from latentcache.encode import distributed

    store = torch.distributed.HashStore()
    monkeypatch.setattr(distributed, "_dist", lambda: SimpleNamespace(is_initialized=lambda: True))
    monkeypatch.setattr(distributed, "_store", lambda dist: store)
    got: dict[int, list[str]] = {}
    keys_when_rank_0_left: list[int] = []

    def rank(r: int) -> None:
        if r == 2:
            time.sleep(0.5)  # the slowest rank
        got[r] = distributed.exchange(f"payload{r}", r, 3)
        if r == 0:
            keys_when_rank_0_left.append(store.num_keys())

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert got == {r: ["payload0", "payload1", "payload2"] for r in range(3)}
    # 3 call counters + 3 posted + 2 "read": rank 0 left only after the others had read.
    assert keys_when_rank_0_left == [8]

    monkeypatch.setenv("LATENTCACHE_DIST_WAIT_S", "0.3")
    with pytest.raises(RuntimeError, match="ranks 1, 2 did not finish"):
        distributed.exchange("alone", 0, 3)
