"""WS /v1/videos/stream under hostile and careless clients, against a real uvicorn with the `websockets` client:
bad frames answered without ending the session, keys outside the URL, origins, and per-connection limits."""

from __future__ import annotations

import asyncio
import json

import pytest
import websockets

from aptserve.server.app import create_app
from tests.server.conftest import GenerationGate, LiveServer, make_settings, services_of

SHORT = {"type": "generate", "prompt": "a red circle moving left", "seconds": 0.5}


@pytest.fixture
def live(tmp_path):
    """Start real servers with `live(**settings_overrides)`; all are stopped at the end of the test."""
    servers: list[LiveServer] = []

    def start(**overrides) -> LiveServer:
        servers.append(LiveServer(create_app(make_settings(tmp_path, **({"warmup": False} | overrides)))).start())
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def ws_url(server: LiveServer) -> str:
    return server.url.replace("http", "ws") + "/v1/videos/stream"


async def next_event(ws, timeout: float = 10.0) -> dict:
    """The next JSON event, skipping binary fMP4 pieces."""
    while True:
        message = await asyncio.wait_for(ws.recv(), timeout)
        if isinstance(message, str):
            return json.loads(message)


async def until(ws, *kinds: str) -> dict:
    while (event := await next_event(ws, 60))["type"] not in kinds:
        pass
    return event


async def answers(ws) -> bool:
    """Whether the session takes requests: a cancel of nothing gets its error event (not a close)."""
    await ws.send(json.dumps({"type": "cancel", "id": "video_none"}))
    return (await next_event(ws))["error"]["code"] == "not_found"


def close_code(url: str, first: str | bytes | None = None, **connect) -> int:
    """Connect, optionally send `first`, then a request; 1000 if the session answers it, else the close code."""

    async def session() -> int:
        async with websockets.connect(url, **connect) as ws:
            try:
                if first is not None:
                    await ws.send(first)
                return 1000 if await answers(ws) else -1
            except websockets.ConnectionClosed as exc:
                return exc.rcvd.code

    return asyncio.run(session())


def test_bad_frames_get_error_events_and_the_session_goes_on(live):
    server = live()

    async def session():
        async with websockets.connect(ws_url(server)) as ws:
            await ws.send(json.dumps({"type": "cancel"}))
            nothing = await next_event(ws)
            await ws.send(json.dumps(SHORT))  # held in the engine while the bad frames come
            await until(ws, "queued")
            await ws.send(b"\x00\x01binary")
            binary = await next_event(ws)
            await ws.send("[" * 20000 + "]" * 20000)
            nested = await next_event(ws)
            await ws.send(json.dumps({"type": "cancel", "id": "video_nope"}))
            unknown = await next_event(ws)
            gate.release()
            return binary, nested, unknown, nothing, await until(ws, "done", "error", "cancelled")

    with GenerationGate(services_of(server), hold_at=0) as gate:
        binary, nested, unknown, nothing, last = asyncio.run(session())
    assert binary["type"] == "error" and binary["status"] == 400 and binary["error"]["code"] == "invalid_message"
    assert nested["type"] == "error" and nested["error"]["code"] == "invalid_json"
    assert unknown["type"] == "error" and unknown["status"] == 404 and unknown["error"]["param"] == "id"
    assert unknown["id"] == "video_nope" and unknown["error"]["code"] == "not_found"
    assert nothing["type"] == "error" and nothing["status"] == 404
    assert last["type"] == "done"  # the generation in flight lived through it all


def test_the_key_as_a_subprotocol_or_a_first_message(live):
    server = live(api_keys="sekrit")
    url = ws_url(server)

    async def protocol() -> str | None:
        async with websockets.connect(url, subprotocols=["aptserve", "aptserve.bearer.sekrit"]) as ws:
            return ws.subprotocol  # the secret one is never echoed

    assert asyncio.run(protocol()) == "aptserve"
    assert close_code(url, subprotocols=["aptserve", "aptserve.bearer.sekrit"]) == 1000
    assert close_code(url, subprotocols=["aptserve", "aptserve.bearer.wrong"]) == 4401
    assert close_code(url, json.dumps({"type": "auth", "api_key": "sekrit"})) == 1000
    assert close_code(url, json.dumps({"type": "auth", "api_key": "wrong"})) == 4401
    assert close_code(url, b"binary") == 4401
    assert close_code(url) == 4401  # a generate without any key
    assert close_code(url + "?api_key=sekrit") == 1000  # old clients


def test_the_auth_message_is_waited_for_only_so_long(live):
    server = live(api_keys="sekrit", header_timeout_s=0.5)

    async def silent() -> int:
        async with websockets.connect(ws_url(server)) as ws:
            with pytest.raises(websockets.ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), 5)
            return info.value.rcvd.code

    assert asyncio.run(silent()) == 4401


def test_origins_outside_the_allow_list_are_refused_at_the_handshake(live):
    server = live(allowed_origins="http://app.example")
    url = ws_url(server)
    with pytest.raises(websockets.InvalidStatus) as info:
        close_code(url, origin="http://evil.example")
    assert info.value.response.status_code == 403
    assert close_code(url, origin=server.url) == 1000  # the demo page's own origin
    assert close_code(url, origin="http://app.example") == 1000
    assert close_code(url) == 1000  # no Origin: not a browser


def test_a_message_over_the_size_limit_closes_the_connection(live):
    server = live(ws_max_message_bytes=1024)

    async def session() -> int:
        async with websockets.connect(ws_url(server)) as ws:
            await ws.send(json.dumps({"type": "generate", "prompt": "x" * 2048}))
            with pytest.raises(websockets.ConnectionClosed) as info:
                await ws.recv()
            return info.value.rcvd.code

    assert asyncio.run(session()) == 1009


def test_messages_over_the_rate_limit_get_429(live):
    server = live(ws_messages_per_second=5)

    async def session():
        async with websockets.connect(ws_url(server)) as ws:
            for _ in range(20):
                await ws.send(json.dumps({"type": "cancel", "id": "video_nope"}))
            codes = [(await next_event(ws))["error"]["code"] for _ in range(20)]
            await asyncio.sleep(1.0)
            return codes, await answers(ws)

    codes, answered = asyncio.run(session())
    assert codes.count("rate_limited") >= 10 and codes.count("not_found") >= 5, codes
    assert answered  # the connection lives on once the client slows down


def test_one_connection_cannot_take_every_queue_slot(live):
    server = live(ws_max_inflight=2, max_queue=8)

    async def session():
        async with websockets.connect(ws_url(server)) as ws:
            for _ in range(3):
                await ws.send(json.dumps(SHORT))
            events = []  # a `started` may come in between
            while sum(e["type"] in ("queued", "error") for e in events) < 3:
                events.append(await next_event(ws))
            gate.release()
            done = [await until(ws, "done") for _ in range(2)]
            return events, done

    with GenerationGate(services_of(server), hold_at=0) as gate:
        events, done = asyncio.run(session())
    refused = [e for e in events if e["type"] == "error"]
    assert [e["type"] for e in events].count("queued") == 2 and len(refused) == 1
    assert refused[0]["status"] == 429 and refused[0]["error"]["code"] == "too_many_generations"
    assert len(done) == 2
