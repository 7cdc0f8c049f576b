"""The demo page in a real browser: Debian's chromium plays a WebSocket stream from a live server through MSE."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Without the background-networking flags chromium's own traffic gets connections refused on a closed network.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
    "--no-first-run",
    "--disable-quic",
]
TIMEOUT_MS = 60_000

PLAYBACK = """() => {
  const video = document.getElementById("player");
  const quality = video.getVideoPlaybackQuality();
  const buffered = video.buffered.length ? video.buffered.end(video.buffered.length - 1) : 0;
  return {
    totalVideoFrames: quality.totalVideoFrames,
    droppedVideoFrames: quality.droppedVideoFrames,
    decodedFrames: video.webkitDecodedFrameCount,
    currentTime: video.currentTime,
    played: video.played.length,
    ended: video.ended,
    buffered,
    videoWidth: video.videoWidth,
    mediaError: video.error && video.error.message,
  };
}"""


@pytest.fixture
def page():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no chromium binary at {CHROMIUM}; install Debian's chromium package to run the browser test")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser.new_page(viewport={"width": 1100, "height": 720})
        finally:
            browser.close()


def test_demo_page_streams_and_plays_a_clip(live_server, page, tmp_path):
    page_errors: list[str] = []
    page.on("pageerror", lambda exc: page_errors.append(str(exc)))
    page.goto(live_server.url + "/")
    page.wait_for_function("() => window.aptserve && window.aptserve.state.connected", timeout=TIMEOUT_MS)

    page.wait_for_function("() => document.getElementById('size').value !== ''", timeout=TIMEOUT_MS)
    assert page.input_value("#size") == "64x64"  # the model's default size, from /v1/models
    page.fill("#prompt", "a red circle moving left")
    page.fill("#seed", "7")
    page.click("#generate")
    page.wait_for_function(
        "() => window.aptserve.lastDone || window.aptserve.lastError || window.aptserve.state.phase === 'error'",
        timeout=TIMEOUT_MS,
    )
    app = page.evaluate("() => ({done: window.aptserve.lastDone, error: window.aptserve.lastError})")
    assert app["error"] is None, app["error"]
    assert page.text_content("#stat-state") == "done", page.text_content("#message")
    frames = app["done"]["frames"]
    assert frames == 49
    assert set(app["done"]["timings"]) >= {"text_encode", "dit", "vae_decode", "encode"}

    # The whole clip is appended; let it play to its end, then every frame must have gone through the decoder.
    page.wait_for_function("() => document.getElementById('player').ended", timeout=TIMEOUT_MS)
    playback = page.evaluate(PLAYBACK)
    assert playback["mediaError"] is None, playback
    assert playback["videoWidth"] == 64
    assert playback["played"] > 0 and playback["currentTime"] > 1.5
    assert playback["buffered"] == pytest.approx(frames / 24, abs=0.1)
    assert playback["totalVideoFrames"] == frames, playback
    assert page.text_content("#stat-chunks") == "13 / 13"
    assert page.text_content("#stat-first-chunk").endswith("s")
    assert page.get_attribute("#message", "class") != "error"
    assert page_errors == []

    shot = tmp_path / "demo.png"
    page.screenshot(path=str(shot), full_page=True)
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000


def test_demo_page_reconnects_and_shows_request_errors(live_server, page):
    page.goto(live_server.url + "/")
    connected = "() => window.aptserve.state.connected"
    page.wait_for_function(connected, timeout=TIMEOUT_MS)
    page.evaluate("() => window.aptserve.state.socket.close()")
    page.wait_for_function("() => !window.aptserve.state.connected", timeout=TIMEOUT_MS)
    page.wait_for_function(connected, timeout=TIMEOUT_MS)

    page.fill("#prompt", "a blue square")
    page.fill("#size", "100x64")
    page.click("#generate")
    page.wait_for_function("() => window.aptserve.lastError", timeout=TIMEOUT_MS)
    error = page.evaluate("() => window.aptserve.lastError")
    assert error["status"] == 400 and error["error"]["param"] == "size"
    assert page.get_attribute("#message", "class") == "error"
    assert page.text_content("#message").startswith("Error 400:")
    assert page.is_enabled("#generate") and not page.is_enabled("#cancel")


def test_demo_page_explains_a_missing_api_key(live_server_factory, page):
    server = live_server_factory(api_keys=["sekrit"])
    page.goto(server.url + "/")
    page.wait_for_function("() => document.getElementById('connection').textContent === 'invalid API key'")
    assert "#api_key=" in page.text_content("#message")
    sockets: list[str] = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    page.goto("about:blank")  # else only the fragment would change, without a reload
    page.goto(server.url + "/#api_key=sekrit")  # a fragment never reaches the server, its log or a Referer
    page.wait_for_function("() => window.aptserve.state.connected", timeout=TIMEOUT_MS)
    page.wait_for_function("() => document.getElementById('size').value !== ''", timeout=TIMEOUT_MS)  # /v1/models
    assert sockets and not any("sekrit" in url for url in sockets)  # the key went in the first message
    page.goto(server.url + "/?api_key=sekrit")  # links from before still work
    page.wait_for_function("() => window.aptserve.state.connected", timeout=TIMEOUT_MS)
