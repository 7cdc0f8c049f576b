"""`aptserve serve --model <Wan2.1 diffusers folder>` as a user runs it: the CLI in a subprocess on a tiny
`save_pretrained` WanPipeline (with a two-step sigma list in a spec file), answering the OpenAI SDK and the WebSocket
stream with MP4s that decode at the model's 16 fps and its sizes; /v1/models says what the model serves."""

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import warnings

import httpx
import openai
import pytest

from tests.server.test_streaming import decode, ws_generate

pytest.importorskip("diffusers", reason="diffusers writes the tiny Wan2.1 folder (a test-only oracle)")
warnings.filterwarnings("ignore", category=DeprecationWarning, module="openai")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def wan_server(tiny_wan_folder, tmp_path_factory):
    folder = tmp_path_factory.mktemp("wan-serve")
    spec = folder / "wan-2step.json"
    spec.write_text(json.dumps({"base": str(tiny_wan_folder), "name": "wan-2step", "sample_sigmas": [1.0, 0.75]}))
    port = free_port()
    command = [sys.executable, "-m", "aptserve", "serve", "--model", str(spec), "--port", str(port)]
    command += ["--data-dir", str(folder / "data"), "--warmup-shapes", "480x832:0.25", "--log-level", "warning"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                break
        time.sleep(0.2)
    else:
        process.kill()
        pytest.fail(f"the server never became ready:\n{process.communicate()[0]}")
    yield url
    process.terminate()
    process.wait(60)


def test_models_lists_sizes_fps_and_steps(wan_server):
    card = httpx.get(wan_server + "/v1/models").json()["data"][0]
    assert card["id"] == "wan-2step" and card["architecture"] == "wan2.1"
    assert (card["fps"], card["default_size"], card["default_steps"]) == (16, "832x480", 2)
    assert card["sizes"] == ["832x480", "480x832", "1280x720", "720x1280"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_openai_sdk_gets_a_wan_video(wan_server):
    client = openai.OpenAI(base_url=wan_server + "/v1", api_key="unused", max_retries=0)
    done = client.videos.create_and_poll(prompt="a red circle moving left", seconds="0.5", size="832x480")
    assert done.status == "completed" and done.size == "832x480" and done.model == "wan-2step"
    assert decode(client.videos.download_content(done.id).read()) == (9, 832, 480, 16)
    with pytest.raises(openai.BadRequestError) as info:
        client.videos.create(prompt="x", size="64x64")
    assert info.value.body["param"] == "size" and "832x480, 480x832" in info.value.body["message"]


def test_websocket_streams_a_wan_video(wan_server):
    url = wan_server.replace("http", "ws") + "/v1/videos/stream"
    message = {"type": "generate", "prompt": "a cat on the grass", "size": "480x832", "seconds": 0.5, "seed": 1}
    events, data = asyncio.run(ws_generate(url, message))
    kinds = [e["type"] for e in events]
    assert kinds[0] == "queued" and kinds[-1] == "done" and kinds.count("chunk") == 3
    assert decode(data) == (9, 480, 832, 16)
