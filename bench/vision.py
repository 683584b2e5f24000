"""What one image costs: prompt tokens, time to first token, memory.

`python -m bench.vision [--repeats 5]`

Starts the worker on the tiny PaddleOCR-VL (tools/tiny_vlm.py), then, for one
image at 224², 448² and 896² (chat path, one output token), interleaved
repeats, each with a new image (vLLM caches processed images by content, so a
repeated image would measure the cache): prompt tokens; the client's time from
sending the request to the reply with its one token (decode, the model's
processor, prefill: what the user waits for the first token); the worker's
`timing_prompt_processing` (vLLM's first-token latency, counted from when the
rendered request reaches the engine, so without decode and processor); and the
RSS of the worker process and of the engine processes (core + model runner)
after a burst of each size. A text-only request is the baseline. Medians with
[min-max]: the machine is shared.

Also, in-process and engine-free: the CPU time to decode a 4000x3000 JPEG and
PNG, and how long the event loop stalls while a request carrying the PNG is
prepared by backend.media (off the loop) against the same decode on the loop.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import sys
import time
from types import SimpleNamespace
from typing import Any

from PIL import Image

SIZES = (224, 448, 896)


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _engine_pids(pid: int) -> list[int]:
    import psutil

    return [p.pid for p in psutil.Process(pid).children(recursive=True)]


def _spread(values: list[float], fmt: str = "{:.0f}") -> str:
    mid, low, high = (fmt.format(v) for v in (statistics.median(values), min(values), max(values)))
    return f"{mid} [{low}-{high}]"


def engine_costs(repeats: int) -> dict[str, Any]:
    from backend.gen import backend_pb2 as pb
    from tests.conftest import Worker, tiny_load_options
    from tests.media_samples import b64, picture
    from tools.tiny_vlm import build_tiny_vlm, default_vlm_dir

    model_dir = build_tiny_vlm(default_vlm_dir("paddleocr"), "paddleocr")
    # grpcio: the h2 transport (at this commit) stops reading a connection
    # when a message larger than its remaining connection window arrives
    # (reproduced in tests/integration/test_vision.py), which image-sized
    # requests in sequence hit.
    worker = Worker(args=["--transport", "grpcio"])
    print(f"worker log: {worker.log_path}", file=sys.stderr)
    try:
        result = worker.stub.LoadModel(tiny_load_options(model_dir, MaxModelLen=4096), timeout=600)
        assert result.success, result.message
        engine = _engine_pids(worker.proc.pid)

        def ask(images: list[str]) -> pb.Reply:
            return worker.stub.Predict(
                pb.PredictOptions(
                    UseTokenizerTemplate=True,
                    Messages=[pb.Message(role="user", content="What is in the picture?")],
                    Images=images,
                    Tokens=1,
                    Temperature=0,
                ),
                timeout=300,
            )

        for _ in range(3):  # warm-up: first requests compile/allocate
            ask([b64(picture(64, 64, seed=99))])
        rss = {"loaded": (_rss_mib(worker.proc.pid), sum(_rss_mib(p) for p in engine))}
        rows: dict[str, dict[str, list[float]]] = {
            k: {"tokens": [], "ttft": [], "wall": []} for k in ("text", *map(str, SIZES))
        }
        for r in range(repeats):
            for key in ("text", *map(str, SIZES)):
                n = int(key) if key != "text" else 0
                images = [b64(picture(n, n, seed=1000 * r + n))] if n else []
                started = time.perf_counter()
                reply = ask(images)
                rows[key]["wall"].append((time.perf_counter() - started) * 1000)
                rows[key]["tokens"].append(reply.prompt_tokens)
                rows[key]["ttft"].append(reply.timing_prompt_processing)
        for n in SIZES:  # memory after a burst of each size (distinct images)
            for r in range(repeats):
                ask([b64(picture(n, n, seed=5000 + 1000 * r + n))])
            rss[str(n)] = (_rss_mib(worker.proc.pid), sum(_rss_mib(p) for p in engine))
        return {"rows": rows, "rss": rss}
    finally:
        worker.stop()


def _photo(width: int, height: int) -> Image.Image:
    import numpy as np

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], -1)
    base = base + rng.integers(-20, 20, base.shape)
    return Image.fromarray(np.clip(base, 0, 255).astype("uint8"))


def decode_costs(repeats: int) -> dict[str, Any]:
    import base64

    from backend import media

    photo = _photo(4000, 3000)
    out: dict[str, Any] = {}
    encoded = {}
    for fmt in ("JPEG", "PNG"):
        buf = io.BytesIO()
        photo.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        raw = buf.getvalue()
        encoded[fmt] = base64.b64encode(raw).decode()
        media.decode_image(raw, "Images[0]", media.PixelBudget())  # imports, warm-up
        times = []
        for _ in range(repeats):
            started = time.thread_time()
            media.decode_image(raw, "Images[0]", media.PixelBudget())
            times.append((time.thread_time() - started) * 1000)
        out[fmt] = {"MB": len(raw) / 1e6, "decode_cpu_ms": times}

    async def stall(inline: bool) -> float:
        """Longest gap between 1 ms ticks while the PNG request is prepared."""
        gaps: list[float] = []
        done = asyncio.Event()

        async def ticker() -> None:
            last = time.perf_counter()
            while not done.is_set():
                await asyncio.sleep(0.001)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0.01)
        request = SimpleNamespace(Images=[encoded["PNG"]], Videos=[], Audios=[])
        if inline:
            media._images(request.Images)
        else:
            await media.multi_modal_data(request, {"image": 1})
        done.set()
        await task
        return max(gaps) * 1000

    out["stall_ms"] = {
        "on the loop": [asyncio.run(stall(True)) for _ in range(repeats)],
        "backend.media (pool)": [asyncio.run(stall(False)) for _ in range(repeats)],
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.vision")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-engine", action="store_true")
    args = parser.parse_args()

    dec = decode_costs(args.repeats)
    for fmt in ("JPEG", "PNG"):
        d = dec[fmt]
        print(f"4000x3000 {fmt} ({d['MB']:.1f} MB): decode {_spread(d['decode_cpu_ms'])} ms CPU")
    for how, values in dec["stall_ms"].items():
        print(f"longest event-loop stall preparing the PNG, decode {how}: {_spread(values)} ms")
    if args.skip_engine:
        return
    res = engine_costs(args.repeats)
    print(
        "\n| image | prompt tokens | request → 1 token, client ms | engine TTFT ms | "
        "worker RSS MiB | engine RSS MiB |"
    )
    print("|---|---|---|---|---|---|")
    loaded = res["rss"]["loaded"]
    print(f"| (loaded, before images) | | | | {loaded[0]:.0f} | {loaded[1]:.0f} |")
    for key, row in res["rows"].items():
        label = "text only" if key == "text" else f"{key}x{key}"
        rss = res["rss"].get(key)
        mem = f"{rss[0]:.0f} | {rss[1]:.0f}" if rss else " | "
        tokens = _spread(row["tokens"])
        wall, ttft = _spread(row["wall"], "{:.1f}"), _spread(row["ttft"], "{:.1f}")
        print(f"| {label} | {tokens} | {wall} | {ttft} | {mem} |")


if __name__ == "__main__":
    main()
