"""Serving overhead: a clip through a real `aptserve serve` over HTTP vs the same work in-process, and time to the
first streamed fragment vs the whole clip. Runs alternate so both sides see the same machine state.

    python bench/serve_overhead.py [--model tiny] [--seconds 2] [--repeats 15]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx
import torch
from harness import free_port

from aptserve.engines.pipeline import Pipeline
from aptserve.media.encoder import FragmentedMP4Encoder

PROMPT = "a red circle moving left"


def start_server(args: argparse.Namespace, data_dir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    exe = Path(sys.executable).parent / "aptserve"
    cmd = [
        str(exe),
        "serve",
        "--model",
        args.model,
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()}")
        time.sleep(0.1)
    raise RuntimeError("server did not become ready")


def direct(pipeline: Pipeline, seed: int, seconds: float) -> float:
    """The same work as the server's sync route: text, DiT, chunked VAE decode, fMP4 encode."""
    start = time.perf_counter()
    request = pipeline.request(PROMPT, seed, None, seconds)
    with FragmentedMP4Encoder(request.width, request.height, pipeline.config.fps) as encoder:
        data = [piece for chunk in pipeline.generate(request) for piece in encoder.write(chunk.frames[0])]
        data += encoder.close()
    assert sum(map(len, data)) > 0
    return time.perf_counter() - start


def over_http(client: httpx.Client, url: str, seed: int, seconds: float) -> float:
    start = time.perf_counter()
    response = client.post(url + "/v1/videos/sync", json={"prompt": PROMPT, "seed": seed, "seconds": seconds})
    response.raise_for_status()
    return time.perf_counter() - start


def streamed(client: httpx.Client, url: str, seed: int, seconds: float) -> tuple[float, float]:
    """(time to the first media fragment, time to the last byte) of a streamed response."""
    start, first, body = time.perf_counter(), None, b""
    body_json = {"prompt": PROMPT, "seed": seed, "seconds": seconds, "stream": True}
    with client.stream("POST", url + "/v1/videos/sync", json=body_json) as response:
        for data in response.iter_bytes():
            body += data
            if first is None and b"moof" in body:
                first = time.perf_counter() - start
    return first, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"aptserve-bench-{os.getpid()}"
    proc, url = start_server(args, data_dir)
    try:
        pipeline = Pipeline.from_name(args.model)
        rows: dict[str, list[float]] = {"direct": [], "http": [], "first_fragment": [], "whole_stream": []}
        with httpx.Client(timeout=120) as client:
            for seed in range(2):  # warm-up both sides
                direct(pipeline, seed, args.seconds), over_http(client, url, seed, args.seconds)
                streamed(client, url, seed, args.seconds)
            for i in range(args.repeats):
                rows["direct"].append(direct(pipeline, 100 + i, args.seconds))
                rows["http"].append(over_http(client, url, 100 + i, args.seconds))
                first, whole = streamed(client, url, 200 + i, args.seconds)
                rows["first_fragment"].append(first)
                rows["whole_stream"].append(whole)
    finally:
        proc.terminate()
        proc.wait(30)
    med = {k: statistics.median(v) for k, v in rows.items()}
    ratios = [h / d for h, d in zip(rows["http"], rows["direct"])]
    print(
        f"model {args.model}, {args.seconds:g} s clips, {args.threads} threads, median of {args.repeats} alternating runs"
    )
    print()
    print("| measure | median s |")
    print("|---|---:|")
    print(f"| direct: pipeline + fMP4 encode in-process | {med['direct']:.3f} |")
    print(f"| HTTP: POST /v1/videos/sync (whole MP4) | {med['http']:.3f} |")
    print(f"| streamed: first fragment | {med['first_fragment']:.3f} |")
    print(f"| streamed: whole clip | {med['whole_stream']:.3f} |")
    print()
    print("| ratio | value |")
    print("|---|---:|")
    print(f"| HTTP / direct (ratio of medians) | {med['http'] / med['direct']:.3f} |")
    print(f"| HTTP / direct (median of paired ratios) | {statistics.median(ratios):.3f} |")
    print(f"| first fragment / whole streamed clip | {med['first_fragment'] / med['whole_stream']:.3f} |")


if __name__ == "__main__":
    main()
