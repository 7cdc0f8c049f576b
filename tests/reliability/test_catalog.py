"""The bad-input catalog: hand-written hostile requests over REST JSON, multipart and form bodies, query strings,
headers, raw HTTP and the WebSocket, against one real `aptserve serve` with keys k1 and k2.

Every case must be refused: a 4xx (a WebSocket: an error event with a 4xx status and a session that still answers,
a close code 4000-4999, 1008 or 1009, or a 4xx handshake refusal), in the OpenAI error envelope
`{"error": {"message", "type", "param", "code"}}` where the body is JSON (and for every answer the app itself
gives), with no traceback or server path in the body, the headers or the server's log, and /healthz answering
afterwards. Statuses are exact where they are settled; where issue 24's fixes change them (413 for large bodies,
415 for text/plain and browser bodies, 431 for large heads, 404 for another key's jobs, WebSocket auth by
subprotocol or first message) a case asserts only "refused, enveloped, no leak". A case that generates anything
asks for 64x64 and 0.25 s."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections import Counter

import httpx
import pytest
import websockets

from tests.reliability.conftest import leaks

KEY, OTHER_KEY = "k1", "k2"
SMALL = {"seconds": 0.25, "size": "64x64"}
VALID = {"prompt": "a red circle moving left", **SMALL}
JSON_TYPE = {"content-type": "application/json"}
URLENCODED = {"content-type": "application/x-www-form-urlencoded"}
BROWSER_TEXT = {"Origin": "http://evil.example", "content-type": "text/plain"}  # a form-free cross-site POST
LATIN1_KEY = "Bearer kö".encode("latin-1")
TRIED: Counter = Counter()
HELD: Counter = Counter()


@pytest.fixture(scope="module")
def server(serve):
    return serve(api_keys=f"{KEY},{OTHER_KEY}", default_seconds=0.25)


@pytest.fixture(scope="module")
def jobs(server) -> list[str]:
    """Two completed videos of key k1: one to read across keys, one to delete across keys."""
    auth = {"Authorization": f"Bearer {KEY}"}
    ids = [httpx.post(server.url + "/v1/videos", json=VALID, headers=auth).json()["id"] for _ in range(2)]
    deadline = time.monotonic() + 120
    while any(httpx.get(f"{server.url}/v1/videos/{i}", headers=auth).json()["status"] != "completed" for i in ids):
        assert time.monotonic() < deadline, "the catalog's own videos did not complete"
        time.sleep(0.1)
    return ids


@pytest.fixture(scope="module", autouse=True)
def counts():
    """Print the cases tried and held by category (run with -s)."""
    yield
    width = max(map(len, TRIED), default=0)
    print(f"\nbad-input catalog: {sum(TRIED.values())} cases, {sum(HELD.values())} held")
    for category, tried in TRIED.items():
        print(f"  {category:<{width}}  {tried:>3} tried  {HELD[category]:>3} held")


def http(
    id: str, method: str, path: str, status: int | None = None, *, key: str | None = KEY, app: bool = True, **send
):
    """A case sent with httpx: `status` exact, or None for any 4xx; `app=False` where the HTTP layer may answer
    (its plain-text 4xx is fine), `key` the bearer key (None: no Authorization header)."""
    return pytest.param(method, path, status, key, app, send, id=id)


def post(id: str, status: int | None = None, **send):
    """A case POSTed to /v1/videos."""
    return http(id, "POST", "/v1/videos", status, **send)


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# ----- what every case must show ---------------------------------------------------------------------------------


def assert_envelope(body: dict) -> None:
    error = body.get("error") if isinstance(body, dict) else None
    assert isinstance(error, dict), f"not the OpenAI error envelope: {body}"
    assert {"message", "type", "param", "code"} <= error.keys(), f"envelope misses fields: {body}"
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str), body


def assert_refused(status: int, expected: int | None, headers: dict[str, str], body: bytes, app: bool) -> None:
    text = body.decode(errors="replace")
    assert (status == expected) if expected else 400 <= status < 500, f"got {status}, want {expected or '4xx'}: {text}"
    head = "\n".join(f"{k}: {v}" for k, v in headers.items())
    assert not leaks(text + head), f"leaks {leaks(text + head)}: {text[:2000]}"
    is_json = headers.get("content-type", "").startswith("application/json")
    assert is_json or not app, f"a plain {headers.get('content-type')} answer, not the JSON envelope: {text[:500]}"
    if is_json:
        assert_envelope(json.loads(body))


def assert_still_serving(server, log_from: int) -> None:
    assert httpx.get(server.url + "/healthz", timeout=10).status_code == 200, "the server stopped answering"
    logged = server.log()[log_from:]
    last = logged.strip().splitlines()[-1] if logged.strip() else ""
    assert not leaks(logged, "Exception in ASGI application"), (
        f"the server logged a traceback ({last}):\n{logged[-3000:]}"
    )


def record(category: str, check) -> None:
    TRIED[category] += 1
    check()
    HELD[category] += 1


def over_http(server, jobs, method, path, status, key, app, send) -> None:
    auth = {} if key is None else {"Authorization": f"Bearer {key}"}
    send = send | {"headers": auth | send.get("headers", {})}
    path = path.format(job=jobs[0], other_job=jobs[1])
    log_from = len(server.log())
    # One connection per case: what one case does to its connection must not decide the next.
    response = httpx.request(method, server.url + path, timeout=30, **send)
    assert_refused(response.status_code, status, dict(response.headers), response.content, app)
    assert_still_serving(server, log_from)


# ----- REST JSON: bodies, routes and methods ----------------------------------------------------------------------

REST_JSON = [
    post("empty object", 400, json={}),
    post("blank prompt", 400, json={"prompt": "   ", **SMALL}),
    post("empty prompt", 400, json={"prompt": "", **SMALL}),
    post("null prompt", 400, json={"prompt": None, **SMALL}),
    post("number prompt", 400, json={"prompt": 42, **SMALL}),
    post("list prompt", 400, json={"prompt": ["a", "b"], **SMALL}),
    post("object prompt", 400, json={"prompt": {"text": "a"}, **SMALL}),
    post("prompt of 4001 chars", 400, json={"prompt": "a" * 4001, **SMALL}),
    post("lone surrogate prompt", 400, content=b'{"prompt": "\\ud800"}', headers=JSON_TYPE),
    post("size not a multiple of 16", 400, json=VALID | {"size": "100x64"}),
    post("size a word", 400, json=VALID | {"size": "big"}),
    post("size over the pixel limit", 400, json=VALID | {"size": "4096x4096"}),
    post("size with three axes", 400, json=VALID | {"size": "64x64x64"}),
    post("negative size", 400, json=VALID | {"size": "-64x64"}),
    post("zero size", 400, json=VALID | {"size": "0x0"}),
    post("size a number", 400, json=VALID | {"size": 64}),
    post("size of 10k digits", 400, json=VALID | {"size": "1" * 10000 + "x64"}),
    post("seconds 60", 400, json=VALID | {"seconds": 60}),
    post("seconds 0", 400, json=VALID | {"seconds": 0}),
    post("seconds negative", 400, json=VALID | {"seconds": -1}),
    post("seconds a word", 400, json=VALID | {"seconds": "soon"}),
    post("seconds NaN", 400, content=b'{"prompt": "x", "seconds": NaN}', headers=JSON_TYPE),
    post("seconds Infinity", 400, content=b'{"prompt": "x", "seconds": Infinity}', headers=JSON_TYPE),
    post("seconds 1e999", 400, content=b'{"prompt": "x", "seconds": 1e999}', headers=JSON_TYPE),
    post("steps 0", 400, json=VALID | {"steps": 0}),
    post("steps over the limit", 400, json=VALID | {"steps": 51}),
    post("steps fractional", 400, json=VALID | {"steps": 1.5}),
    post("steps 10^30", 400, json=VALID | {"steps": 10**30}),
    post("seed negative", 400, json=VALID | {"seed": -1}),
    post("seed 2^63", 400, json=VALID | {"seed": 2**63}),
    post("seed a word", 400, json=VALID | {"seed": "abc"}),
    post("fps 0", 400, json=VALID | {"fps": 0}),
    post("fps 61", 400, json=VALID | {"fps": 61}),
    post("fps a word", 400, json=VALID | {"fps": "fast"}),
    post("model not served", 400, json=VALID | {"model": "other"}),
    post("model a number", 400, json=VALID | {"model": 5}),
    post("unknown field", 400, json=VALID | {"colour": "red"}),
    post("body a list", 400, json=[VALID]),
    post("body a string", 400, json="a red circle"),
    post("body a number", 400, json=1),
    post("body null", 400, content=b"null", headers=JSON_TYPE),
    post("body empty", 400, content=b"", headers=JSON_TYPE),
    post("truncated JSON", 400, content=b'{"prompt": "x"', headers=JSON_TYPE),
    post("invalid UTF-8", 400, content=b'{"prompt": "\xff\xfe"}', headers=JSON_TYPE),
    post("JSON nested 100k deep", None, content=nested(100_000), headers=JSON_TYPE),
    post("duplicate key, last blank", 400, content=b'{"prompt": "x", "prompt": " "}', headers=JSON_TYPE),
    post("body of 1 MB", None, json=VALID | {"prompt": "a" * 1_000_000}),
    http("sync empty object", "POST", "/v1/videos/sync", 400, json={}),
    http("sync stream 2", "POST", "/v1/videos/sync", 400, json=VALID | {"stream": 2}),
    http("sync stream a word", "POST", "/v1/videos/sync", 400, json=VALID | {"stream": "maybe"}),
    http("sync size a word", "POST", "/v1/videos/sync", 400, json=VALID | {"size": "big"}),
    http("sync seconds 60", "POST", "/v1/videos/sync", 400, json=VALID | {"seconds": 60}),
    http("sync stream with a blank prompt", "POST", "/v1/videos/sync", 400, json={"prompt": " ", "stream": True}),
    http("retrieve unknown id", "GET", "/v1/videos/video_0000", 404),
    http("retrieve id of 10k chars", "GET", "/v1/videos/" + "a" * 10000, 404),
    http("retrieve id with NUL", "GET", "/v1/videos/a%00b", 404),
    http("retrieve id traversing up", "GET", "/v1/videos/..%2F..%2Fetc%2Fpasswd", 404),
    http("retrieve id of emoji", "GET", "/v1/videos/%F0%9F%92%A9", 404),
    http("download unknown id", "GET", "/v1/videos/video_0000/content", 404),
    http("delete unknown id", "DELETE", "/v1/videos/video_0000", 404),
    http("PUT on the list", "PUT", "/v1/videos", 405, json=VALID),
    http("DELETE on the list", "DELETE", "/v1/videos", 405),
    http("PATCH a video", "PATCH", "/v1/videos/{job}", 405, json=VALID),
    http("POST a video", "POST", "/v1/videos/{job}", 405, json=VALID),
    http("POST the models", "POST", "/v1/models", 405, json={}),
    http("GET sync", "GET", "/v1/videos/sync", 404),
    http("unknown route", "GET", "/v1/nothing", 404),
    http("unknown version", "GET", "/v2/videos", 404),
]


@pytest.mark.parametrize(("method", "path", "status", "key", "app", "send"), REST_JSON)
def test_rest_json(server, jobs, method, path, status, key, app, send):
    record("REST JSON", lambda: over_http(server, jobs, method, path, status, key, app, send))


# ----- multipart and urlencoded forms (the OpenAI SDK sends multipart) ------------------------------------------

BOUNDARY = "catalogboundary"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


def multipart(*parts: bytes, end: bool = True) -> bytes:
    body = b"".join(b"--" + BOUNDARY.encode() + b"\r\n" + part + b"\r\n" for part in parts)
    return body + (b"--" + BOUNDARY.encode() + b"--\r\n" if end else b"")


def field(name: str, value: bytes) -> bytes:
    return f'Content-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value


def form(id: str, body: bytes, status: int | None = 400, path: str = "/v1/videos", content_type: str = MULTIPART):
    return http(id, "POST", path, status, content=body, headers={"content-type": content_type})


FORMS = [
    post("file upload", 400, data={"prompt": "x"}, files={"input_reference": ("a.png", b"...")}),
    post("prompt sent as a file", 400, files={"prompt": ("prompt.txt", b"a red circle")}),
    http("sync file upload", "POST", "/v1/videos/sync", 400, data={"prompt": "x"}, files={"upload": ("a.mp4", b"..")}),
    form("no fields", multipart()),
    form("blank prompt", multipart(field("prompt", b" "), field("seconds", b"0.25"))),
    form("seconds a word", multipart(field("prompt", b"x"), field("seconds", b"soon"))),
    form("size huge", multipart(field("prompt", b"x"), field("size", b"99999x99999"))),
    form("seed negative", multipart(field("prompt", b"x"), field("seed", b"-1"))),
    form("steps 0", multipart(field("prompt", b"x"), field("steps", b"0"))),
    form("fps 1000", multipart(field("prompt", b"x"), field("fps", b"1000"))),
    form("unknown field", multipart(field("prompt", b"x"), field("colour", b"red"))),
    form("prompt twice, last blank", multipart(field("prompt", b"x"), field("prompt", b" "))),
    form("sync stream a word", multipart(field("prompt", b"x"), field("stream", b"maybe")), path="/v1/videos/sync"),
    form("no boundary", multipart(field("prompt", b"x")), content_type="multipart/form-data"),
    form("wrong boundary", multipart(field("prompt", b"x")), content_type="multipart/form-data; boundary=other"),
    form("no closing boundary", multipart(field("prompt", b"x"), end=False), status=None),
    form("part without a name", multipart(b"Content-Disposition: form-data\r\n\r\nx"), status=None),
    form("part without headers", multipart(b"\r\nx"), status=None),
    form("a part of 2 MB", multipart(field("prompt", b"a" * 2_000_000)), status=None),
    form("3000 fields", multipart(*(field(f"f{i}", b"x") for i in range(3000))), status=None),
    post("urlencoded blank prompt", None, data={"prompt": ""}),
    post("urlencoded seconds 60", None, data={"prompt": "x", "seconds": "60"}),
    post("urlencoded 3000 fields", None, data={f"f{i}": "x" for i in range(3000)}),
    post("urlencoded nothing but &", None, content=b"&&&", headers=URLENCODED),
    post("urlencoded bad escapes", None, content=b"prompt=%zz&seconds=%", headers=URLENCODED),
]


@pytest.mark.parametrize(("method", "path", "status", "key", "app", "send"), FORMS)
def test_multipart_and_forms(server, jobs, method, path, status, key, app, send):
    record("multipart and forms", lambda: over_http(server, jobs, method, path, status, key, app, send))


# ----- query strings ----------------------------------------------------------------------------------------------

QUERY = [
    http("limit 0", "GET", "/v1/videos?limit=0", 400),
    http("limit 101", "GET", "/v1/videos?limit=101", 400),
    http("limit negative", "GET", "/v1/videos?limit=-1", 400),
    http("limit a word", "GET", "/v1/videos?limit=all", 400),
    http("limit fractional", "GET", "/v1/videos?limit=1.5", 400),
    http("limit 10^20", "GET", "/v1/videos?limit=100000000000000000000", 400),
    http("limit empty", "GET", "/v1/videos?limit=", 400),
    http("limit an emoji", "GET", "/v1/videos?limit=%F0%9F%92%A9", 400),
    http("limit twice, last bad", "GET", "/v1/videos?limit=1&limit=all", 400),
    http("order sideways", "GET", "/v1/videos?order=sideways", 400),
    http("order upper case", "GET", "/v1/videos?order=ASC", 400),
    http("order NUL", "GET", "/v1/videos?order=%00", 400),
    http("after unknown", "GET", "/v1/videos?after=video_0000", 404),
    http("after with NUL", "GET", "/v1/videos?after=a%00b", 404),
    http("after of 5k chars", "GET", "/v1/videos?after=" + "a" * 5000, 404),
    http("after a quote", "GET", "/v1/videos?after=%27%20OR%201%3D1--", 404),
    http("variant thumbnail", "GET", "/v1/videos/{job}/content?variant=thumbnail", 400),
    http("variant unknown", "GET", "/v1/videos/{job}/content?variant=poster", 400),
    http("variant empty", "GET", "/v1/videos/{job}/content?variant=", 400),
    http("key in the query, not the header", "GET", f"/v1/videos?api_key={KEY}", 401, key=None),
    http("body fields in the query", "POST", "/v1/videos?prompt=x&seconds=0.25", 400, content=b"", headers=JSON_TYPE),
]


@pytest.mark.parametrize(("method", "path", "status", "key", "app", "send"), QUERY)
def test_query_strings(server, jobs, method, path, status, key, app, send):
    record("query strings", lambda: over_http(server, jobs, method, path, status, key, app, send))


# ----- headers: keys, content types, browsers, sizes, ranges, other keys' videos ---------------------------------

HEADERS = [
    http("no key", "GET", "/v1/videos", 401, key=None),
    http("wrong key", "GET", "/v1/videos", 401, key="nope"),
    http("Bearer and nothing", "GET", "/v1/models", 401, key=None, headers={"Authorization": "Bearer"}),
    http("Basic auth", "GET", "/v1/models", 401, key=None, headers={"Authorization": "Basic azE6"}),
    http("key and trailing words", "GET", "/v1/models", 401, key=f"{KEY} extra"),
    http("key as a prefix", "GET", "/v1/models", 401, key=KEY + KEY),
    http("non-ASCII key (Latin-1)", "GET", "/v1/models", 401, key=None, headers={"Authorization": LATIN1_KEY}),
    post("non-ASCII key (UTF-8)", 401, key=None, headers={"Authorization": "Bearer kö".encode()}, json=VALID),
    post("text/plain JSON body", None, content=json.dumps(VALID), headers={"content-type": "text/plain"}),
    post("urlencoded JSON body", None, content=json.dumps(VALID), headers=URLENCODED),
    post("XML body", None, content=b"<video><prompt>x</prompt></video>", headers={"content-type": "application/xml"}),
    post("foreign Origin, JSON", None, json=VALID, headers={"Origin": "http://evil.example"}),
    http(
        "foreign Origin, text/plain", "POST", "/v1/videos/sync", None, content=json.dumps(VALID), headers=BROWSER_TEXT
    ),
    post("null Origin, form", None, data=VALID, headers={"Origin": "null"}),
    http("foreign Origin, delete", "DELETE", "/v1/videos/video_0000", None, headers={"Origin": "http://evil.example"}),
    http("Range not bytes", "GET", "/v1/videos/{job}/content", None, headers={"Range": "bytes=abc"}),
    http("Range past the end", "GET", "/v1/videos/{job}/content", None, headers={"Range": "bytes=999999999-"}),
    http("Range backwards", "GET", "/v1/videos/{job}/content", None, headers={"Range": "bytes=5-1"}),
    http("Range of zero suffix", "GET", "/v1/videos/{job}/content", None, headers={"Range": "bytes=-0"}),
    http("other key retrieves", "GET", "/v1/videos/{job}", None, key=OTHER_KEY),
    http("other key downloads", "GET", "/v1/videos/{job}/content", None, key=OTHER_KEY),
    http("other key deletes", "DELETE", "/v1/videos/{other_job}", None, key=OTHER_KEY),
]


@pytest.mark.parametrize(("method", "path", "status", "key", "app", "send"), HEADERS)
def test_headers(server, jobs, method, path, status, key, app, send):
    record("headers", lambda: over_http(server, jobs, method, path, status, key, app, send))


# ----- raw HTTP on a socket: what httpx would refuse to send ------------------------------------------------------


def exchange(port: int, data: bytes, wait: float = 5.0) -> bytes:
    """Send raw bytes; read until a whole final response is in, the server closes, or `wait` passes."""
    reply = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        with contextlib.suppress(ConnectionError):  # the server may answer and close before reading it all
            sock.sendall(data)
        try:
            while not answered(reply) and (piece := sock.recv(65536)):
                reply += piece
        except (TimeoutError, ConnectionError):
            pass  # an answer followed by a held or reset connection still counts; no answer fails the case
    return bytes(reply)


def answered(reply: bytes) -> bool:
    head, found, rest = reply.partition(b"\r\n\r\n")
    if not found:
        return False
    if head[9:10] == b"1":  # an interim 100 Continue: the final response follows
        return answered(rest)
    length = next(
        (line.split(b":")[1] for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")), None
    )
    return length is not None and len(rest) >= int(length)


def parse_reply(reply: bytes) -> tuple[int, dict[str, str], bytes]:
    """The final response in `reply` (after any interim 1xx): status, headers (lower-case names), body."""
    head, _, rest = reply.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1."), f"no HTTP answer: {reply[:200]!r}"
    status = int(lines[0].split()[1])
    if 100 <= status < 200 and rest:
        return parse_reply(rest)
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if "content-length" in headers:
        rest = rest[: int(headers["content-length"])]  # drop what follows on a kept-alive connection
    return status, headers, rest


def raw(id: str, *lines: str | bytes, body: bytes = b"") -> pytest.param:
    head = b"".join((line.encode("latin-1") if isinstance(line, str) else line) + b"\r\n" for line in lines)
    return pytest.param(head + b"\r\n" + body, id=id)


AUTH = f"Authorization: Bearer {KEY}"
POST = ("POST /v1/videos HTTP/1.1", "Host: x", AUTH)
UPGRADE = ("Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==")
TEN_GB = ("Content-Type: application/json", "Content-Length: 10000000000")
RAW = [
    raw("not HTTP", "HELLO"),
    raw("bad method characters", "G(T /healthz HTTP/1.1", "Host: x"),
    raw("space in the target", "GET /health z HTTP/1.1", "Host: x"),
    raw("header without a colon", "GET /healthz HTTP/1.1", "Host: x", "X-Broken"),
    raw("space before the colon", "GET /healthz HTTP/1.1", "Host : x"),
    raw("NUL in a header value", "GET /healthz HTTP/1.1", "Host: x", b"X-A: a\x00b"),
    raw("control character in a header name", "GET /healthz HTTP/1.1", "Host: x", b"X-\x01: a"),
    raw("request line of 100 kB", "GET /v1/videos/" + "a" * 100_000 + " HTTP/1.1", "Host: x", AUTH),
    raw("key of 1 MB", "GET /v1/models HTTP/1.1", "Host: x", "Authorization: Bearer " + "k" * 1_000_000),
    raw("one header of 1 MB", "GET /v1/models HTTP/1.1", "Host: x", AUTH, "X-Filler: " + "a" * 1_000_000),
    raw(
        "2000 headers", "GET /v1/models HTTP/1.1", "Host: x", AUTH, *(f"X-Filler-{i}: {'a' * 16}" for i in range(2000))
    ),
    raw("Content-Length negative", *POST, "Content-Length: -1"),
    raw("Content-Length a word", *POST, "Content-Length: ten"),
    raw("two Content-Lengths", *POST, "Content-Length: 2", "Content-Length: 3", body=b"{}"),
    raw("chunked and Content-Length", *POST, "Content-Length: 5", "Transfer-Encoding: chunked", body=b"0\r\n\r\n"),
    raw("unknown Transfer-Encoding", *POST, "Transfer-Encoding: xchunked", body=b"{}"),
    raw("chunk size a word", *POST, "Transfer-Encoding: chunked", body=b"zz\r\n"),
    raw("chunk size overflowing", *POST, "Transfer-Encoding: chunked", body=b"fffffffffffffffffffff\r\n"),
    raw("Content-Length 10 GB, body 2 bytes", *POST, *TEN_GB, body=b"{}"),
    raw("Expect 100-continue for 10 GB", *POST, *TEN_GB, "Expect: 100-continue"),
    raw(
        "WebSocket upgrade of a REST route",
        "GET /v1/videos HTTP/1.1",
        "Host: x",
        AUTH,
        *UPGRADE,
        "Sec-WebSocket-Version: 13",
    ),
    raw(
        "WebSocket version 99", "GET /v1/videos/stream HTTP/1.1", "Host: x", AUTH, *UPGRADE, "Sec-WebSocket-Version: 99"
    ),
    raw("non-ASCII key in raw bytes", "GET /v1/models HTTP/1.1", "Host: x", b"Authorization: Bearer k\xc3\xb6"),
]


@pytest.mark.parametrize("request_bytes", RAW)
def test_raw_http(server, request_bytes):
    def check():
        log_from = len(server.log())
        reply = exchange(server.port, request_bytes)
        assert reply, "no answer within 5 s: the connection was held or dropped"
        status, headers, body = parse_reply(reply)
        assert_refused(status, None, headers, body, app=False)
        assert_still_serving(server, log_from)

    record("raw HTTP", check)


# ----- WebSocket --------------------------------------------------------------------------------------------------

GENERATE = {"type": "generate", **VALID}


def ws(id: str, *messages, auth: bool = True, **connect) -> pytest.param:
    """A WebSocket case: `messages` sent in order (dicts as JSON); `auth` offers key k1 both ways this server may
    take it (Authorization header, and the `aptserve.bearer.<key>` subprotocol)."""
    sent = [m if isinstance(m, str | bytes) else json.dumps(m) for m in messages]
    if auth:
        connect.setdefault("additional_headers", {"Authorization": f"Bearer {KEY}"})
        connect.setdefault("subprotocols", [f"aptserve.bearer.{KEY}"])
    return pytest.param(sent, connect, id=id)


async def ws_exchange(url: str, messages: list, connect: dict) -> dict:
    """What the server did: an `event` (then `probe`: its answer to one more bad message), a `close` code, or an
    HTTP `status` refusing the handshake; `reason`/`body` for the leak check."""
    try:
        async with websockets.connect(url, open_timeout=10, close_timeout=2, max_size=None, **connect) as socket_:
            for message in messages:
                await socket_.send(message)
            event = json.loads(await asyncio.wait_for(socket_.recv(), 5))
            await socket_.send(json.dumps({"type": "probe"}))  # an error must not end the session
            probe = json.loads(await asyncio.wait_for(socket_.recv(), 5))
            return {"event": event, "probe": probe}
    except websockets.InvalidStatus as exc:
        return {"status": exc.response.status_code, "body": exc.response.body or b""}
    except websockets.ConnectionClosed as exc:
        return {"close": exc.rcvd.code if exc.rcvd else 1006, "reason": exc.rcvd.reason if exc.rcvd else ""}
    except TimeoutError:
        return {"timeout": True}


def assert_ws_refused(outcome: dict) -> None:
    assert not outcome.get("timeout"), "no error event and no close within 5 s"
    if "status" in outcome:
        assert 400 <= outcome["status"] < 500 and not leaks(outcome["body"].decode(errors="replace")), outcome
        return
    if "close" in outcome:
        code = outcome["close"]
        assert 4000 <= code < 5000 or code in (1008, 1009), f"closed with {code} ({outcome['reason']!r})"
        assert not leaks(outcome["reason"]), outcome
        return
    for event in (outcome["event"], outcome["probe"]):
        assert event.get("type") == "error", f"not an error event: {str(event)[:500]}"
        assert 400 <= event.get("status", 0) < 500 and not leaks(json.dumps(event)), event
        assert_envelope(event)


WEBSOCKET = [
    ws("binary frame", b"\x00\x01\x02"),
    ws("text not JSON", "hello"),
    ws("JSON list", []),
    ws("JSON string", json.dumps("a red circle")),
    ws("JSON null", None),
    ws("no type", {"prompt": "x"}),
    ws("unknown type", {"type": "render"}),
    ws("type an object", {"type": {"generate": True}}),
    ws("JSON nested 20k deep", nested(20_000).decode()),
    ws("message of 1 MB", GENERATE | {"prompt": "a" * 1_000_000}),
    ws("generate without a prompt", {"type": "generate", **SMALL}),
    ws("generate a blank prompt", GENERATE | {"prompt": " "}),
    ws("generate size a word", GENERATE | {"size": "big"}),
    ws("generate seconds 60", GENERATE | {"seconds": 60}),
    ws("generate steps 0", GENERATE | {"steps": 0}),
    ws("generate fps 0", GENERATE | {"fps": 0}),
    ws("generate seed negative", GENERATE | {"seed": -1}),
    ws("generate unknown field", GENERATE | {"colour": "red"}),
    ws("generate model not served", GENERATE | {"model": "other"}),
    ws("cancel an unknown id", {"type": "cancel", "id": "video_0000"}),
    ws("cancel id a number", {"type": "cancel", "id": 5}),
    ws("cancel unknown field", {"type": "cancel", "id": "video_0000", "why": "x"}),
    ws("200 messages at once", *[{"type": "render"}] * 200),
    ws("no key", GENERATE, auth=False),
    ws("wrong key in the header", GENERATE, auth=False, additional_headers={"Authorization": "Bearer nope"}),
    ws("wrong key as subprotocol", GENERATE, auth=False, subprotocols=["aptserve.bearer.nope"]),
    ws("empty key as subprotocol", GENERATE, auth=False, subprotocols=["aptserve.bearer."]),
    ws("wrong key as first message", {"type": "auth", "api_key": "nope"}, GENERATE, auth=False),
    ws("key a number as first message", {"type": "auth", "api_key": 5}, GENERATE, auth=False),
    ws("non-ASCII key in the header", GENERATE, auth=False, additional_headers={"Authorization": "Bearer kö"}),
    ws("foreign Origin", GENERATE, origin="http://evil.example"),
]


@pytest.mark.parametrize(("messages", "connect"), WEBSOCKET)
def test_websocket(server, messages, connect):
    def check():
        log_from = len(server.log())
        url = server.url.replace("http", "ws") + "/v1/videos/stream"
        assert_ws_refused(asyncio.run(ws_exchange(url, messages, connect)))
        assert_still_serving(server, log_from)

    record("WebSocket", check)
