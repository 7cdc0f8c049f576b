"""Streaming over HTTP and WebSocket against a real uvicorn: event order, decodability, batching, 429, cancellation."""

import asyncio
import io
import json
import socket
import time

import av
import httpx
import websockets
from prometheus_client.parser import text_string_to_metric_families

from aptserve.media.mp4 import iter_boxes
from tests.server.conftest import GenerationGate, services_of

PROMPT = "a red circle moving left"


def decode(data: bytes):
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        return frames, stream.width, stream.height, stream.average_rate


def metric(server, name: str, **labels) -> float:
    text = httpx.get(server.url + "/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise KeyError(name)


def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def stream_two_seconds(server):
    body = {"prompt": PROMPT, "seconds": 2, "stream": True}
    return httpx.stream("POST", server.url + "/v1/videos/sync", json=body, timeout=60)


def has_fragment(data: bytes) -> bool:
    return any(kind == "moof" for kind, _ in iter_boxes(bytes(data)))


def test_http_stream_sends_first_fragment_before_last_chunk_is_generated(live_server):
    with GenerationGate(services_of(live_server), hold_at=12) as gate:
        body = bytearray()
        with stream_two_seconds(live_server) as response:
            assert response.status_code == 200 and response.headers["content-type"] == "video/mp4"
            for data in response.iter_bytes():
                body += data
                if not gate.released.is_set() and has_fragment(body):
                    gate.record("client got first fragment")
                    gate.release()
    assert gate.events.index("client got first fragment") < gate.events.index("generated 12/13 batch 1")
    assert "hold timed out" not in gate.events
    assert decode(bytes(body)) == (49, 64, 64, 24)


def test_sync_whole_mp4(live_server):
    response = httpx.post(
        live_server.url + "/v1/videos/sync",
        json={"prompt": PROMPT, "seconds": 1, "size": "96x64", "seed": 5},
        timeout=60,
    )
    assert response.status_code == 200 and response.headers["x-video-seed"] == "5"
    assert decode(response.content) == (25, 96, 64, 24)


async def ws_generate(url: str, message: dict, on_first_fragment=None):
    """Run one generation over a WebSocket; returns (events, init + fragments)."""
    events, data = [], bytearray()
    async with websockets.connect(url) as ws:
        await ws.send(json.dumps(message))
        while True:
            event = json.loads(await ws.recv())
            events.append(event)
            if event["type"] in ("init", "chunk"):
                payload = await ws.recv()
                assert isinstance(payload, bytes) and len(payload) == event["bytes"]
                data += payload
                if event["type"] == "chunk" and event["index"] == 0 and on_first_fragment:
                    on_first_fragment()
            if event["type"] in ("done", "error", "cancelled"):
                return events, bytes(data)


def test_websocket_stream_order_and_content(live_server):
    url = live_server.url.replace("http", "ws") + "/v1/videos/stream"
    with GenerationGate(services_of(live_server), hold_at=12) as gate:

        def first_fragment():
            gate.record("client got first fragment")
            gate.release()

        events, data = asyncio.run(ws_generate(url, {"type": "generate", "prompt": PROMPT, "seed": 3}, first_fragment))
    kinds = [e["type"] for e in events]
    assert kinds[:3] == ["queued", "started", "init"] and kinds[-1] == "done"
    assert kinds.count("chunk") == 13 and [e["index"] for e in events if e["type"] == "chunk"] == list(range(13))
    assert events[2]["mime"].startswith('video/mp4; codecs="avc1.42')
    assert gate.events.index("client got first fragment") < gate.events.index("generated 12/13 batch 1")
    assert decode(data) == (49, 64, 64, 24)
    assert set(events[-1]["timings"]) == {"text_encode", "dit", "vae_decode", "encode"}


def test_websocket_errors_and_several_generations(live_server):
    url = live_server.url.replace("http", "ws") + "/v1/videos/stream"

    async def session():
        async with websockets.connect(url) as ws:
            await ws.send("not json")
            bad_json = json.loads(await ws.recv())
            await ws.send(json.dumps({"type": "generate", "prompt": "x", "size": "10x10"}))
            bad_size = json.loads(await ws.recv())
            await ws.send(json.dumps({"type": "generate", "prompt": "one", "seconds": 0.5}))
            await ws.send(json.dumps({"type": "generate", "prompt": "two", "seconds": 0.5}))
            done = set()
            while len(done) < 2:
                message = await ws.recv()
                if isinstance(message, str) and json.loads(message)["type"] == "done":
                    done.add(json.loads(message)["id"])
            return bad_json, bad_size, done

    bad_json, bad_size, done = asyncio.run(session())
    assert bad_json["type"] == "error" and bad_json["error"]["code"] == "invalid_json"
    assert bad_size["type"] == "error" and bad_size["error"]["param"] == "size" and bad_size["status"] == 400
    assert len(done) == 2


def test_same_shape_requests_are_batched_and_full_queue_gets_429(live_server_factory):
    server = live_server_factory(max_queue=3, max_batch_size=4)
    url = server.url + "/v1/videos"
    with GenerationGate(services_of(server), hold_at=0) as gate:
        blocker = httpx.post(url, json={"prompt": "blocker", "seconds": 0.5}).json()
        wait_for(gate.holding.is_set)  # the engine is busy: everything below queues
        queued = [httpx.post(url, json={"prompt": f"p{i}", "seconds": 0.5}).json() for i in range(3)]
        full = httpx.post(url, json={"prompt": "one too many", "seconds": 0.5})
        assert full.status_code == 429 and full.headers["retry-after"] == "1"
        assert full.json()["error"]["code"] == "queue_full" and full.json()["error"]["type"] == "rate_limit_error"
        assert metric(server, "aptserve_queue_depth") == 3
        gate.release()
        for job in [blocker, *queued]:
            wait_for(lambda job=job: httpx.get(f"{url}/{job['id']}").json()["status"] == "completed")
    assert "generated 0/4 batch 3" in gate.events  # the three queued same-shape requests ran as one batch
    assert (
        metric(server, "aptserve_batch_size_bucket", le="3.0") - metric(server, "aptserve_batch_size_bucket", le="2.0")
        == 3
    )
    assert metric(server, "aptserve_errors_total", kind="queue_full") == 1


def test_client_disconnect_cancels_generation(live_server):
    with GenerationGate(services_of(live_server), hold_at=3) as gate:
        body = bytearray()
        with stream_two_seconds(live_server) as response:
            for data in response.iter_bytes():
                body += data
                if has_fragment(body):
                    break  # leave mid-stream: closing the response drops the connection
        # The engine is held at chunk 3 at the latest, so it cannot finish before the server sees the client leave.
        wait_for(lambda: metric(live_server, "aptserve_cancelled_total", reason="client_disconnected") == 1)
        gate.release()
        wait_for(lambda: metric(live_server, "aptserve_inflight_requests") == 0)
    generated = [e for e in gate.events if e.startswith("generated")]
    assert len(generated) < 13, generated  # the engine stopped early


def test_sync_client_disconnect_cancels_generation(live_server):
    body = json.dumps({"prompt": PROMPT, "seconds": 2}).encode()
    head = f"POST /v1/videos/sync HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
    with GenerationGate(services_of(live_server), hold_at=3) as gate:
        with socket.create_connection(("127.0.0.1", live_server.port)) as sock:
            sock.sendall(head.encode() + b"\r\n\r\n" + body)
            wait_for(gate.holding.is_set)
        # The client left while the engine is held at chunk 3: the whole MP4 cannot have been sent.
        wait_for(lambda: metric(live_server, "aptserve_cancelled_total", reason="client_disconnected") == 1, 10)
        gate.release()
        wait_for(lambda: metric(live_server, "aptserve_inflight_requests") == 0)
    generated = [e for e in gate.events if e.startswith("generated")]
    assert len(generated) < 13, generated  # the engine stopped early


def test_websocket_cancel_message(live_server):
    url = live_server.url.replace("http", "ws") + "/v1/videos/stream"
    with GenerationGate(services_of(live_server), hold_at=2) as gate:

        async def session():
            async with websockets.connect(url) as ws:
                await ws.send(json.dumps({"type": "generate", "prompt": PROMPT}))
                while True:
                    message = await ws.recv()
                    if isinstance(message, bytes):
                        continue
                    event = json.loads(message)
                    if event["type"] == "queued":
                        await asyncio.to_thread(gate.holding.wait, 30)
                        await ws.send(json.dumps({"type": "cancel", "id": event["id"]}))
                        await asyncio.sleep(0.1)
                        gate.release()
                    if event["type"] in ("cancelled", "done", "error"):
                        return event

        event = asyncio.run(session())
    assert event["type"] == "cancelled" and event["reason"] == "client_cancel"
    assert metric(live_server, "aptserve_cancelled_total", reason="client_cancel") == 1


def test_stream_rejects_bad_input_before_streaming(live_server):
    response = httpx.post(live_server.url + "/v1/videos/sync", json={"prompt": "", "stream": True})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"


def test_deadline_fails_the_job_with_a_reason(live_server_factory):
    server = live_server_factory(request_timeout_s=0.001)
    job = httpx.post(server.url + "/v1/videos", json={"prompt": PROMPT}).json()
    wait_for(lambda: httpx.get(f"{server.url}/v1/videos/{job['id']}").json()["status"] == "failed")
    failed = httpx.get(f"{server.url}/v1/videos/{job['id']}").json()
    assert failed["error"]["code"] == "deadline_exceeded"
    assert metric(server, "aptserve_cancelled_total", reason="deadline") == 1
    assert httpx.post(server.url + "/v1/videos/sync", json={"prompt": PROMPT}).status_code == 504


def test_websocket_needs_the_key_when_keys_are_set(live_server_factory):
    server = live_server_factory(api_keys="sekrit")
    url = server.url.replace("http", "ws") + "/v1/videos/stream"

    async def close_code(query: str) -> int:
        async with websockets.connect(url + query) as ws:
            try:
                await ws.send(json.dumps({"type": "generate", "prompt": PROMPT, "seconds": 0.5}))
                while True:
                    message = await ws.recv()
                    if isinstance(message, str) and json.loads(message)["type"] == "done":
                        return 1000
            except websockets.ConnectionClosed as exc:
                return exc.rcvd.code

    assert asyncio.run(close_code("")) == 4401
    assert asyncio.run(close_code("?api_key=sekrit")) == 1000
