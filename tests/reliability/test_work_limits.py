"""Work limits (issue 24, defects 1 and 7), mostly against a real uvicorn: admission by estimated cost, the deadline
checked inside the forward pass (each ticket of a batch answered as it stops), no charge to queued requests for a
timed-out one's time, and low frame rates that encode at once."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from aptserve.engines.config import MODEL_PRESETS, frames_for_seconds
from aptserve.engines.pipeline import FrameChunk, request_cost
from aptserve.server.app import create_app
from aptserve.server.errors import APIError
from aptserve.server.generation import Generation
from aptserve.server.protocol import VideoCreateParams
from aptserve.server.scheduler import EngineRequest, Failed, Finished, Scheduler, Ticket
from aptserve.server.settings import Settings
from aptserve.server.worker import EngineWorker
from tests.server.conftest import LiveServer, make_settings, services_of
from tests.server.test_streaming import PROMPT, decode, metric

DEADLINE_S = 8.0  # the served deadline: ample for a 64x64 clip on a busy machine
SLOW_TOKENS = 13 * 4 * 4  # video tokens of the stalled request: 64x64 for 2 s = 13 latent frames of 4x4 tokens
TINY = MODEL_PRESETS["tiny"]
WAN_2STEP = dataclasses.replace(  # the served spec of tests/server/test_wan_serving.py
    MODEL_PRESETS["wan-tiny"],
    sample_sigmas=(1.0, 0.75),
    default_steps=2,
    default_size=(832, 480),
    sizes=((832, 480), (480, 832), (1280, 720), (720, 1280)),
)
WAN_BASE = dataclasses.replace(WAN_2STEP, sample_sigmas=(), default_steps=50, guidance_scale=5.0)  # README's base


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    settings = make_settings(tmp_path_factory.mktemp("limits"), request_timeout_s=DEADLINE_S)
    live = LiveServer(create_app(settings)).start()
    yield live
    live.stop()


class SlowBlocks:
    """Counts the generator blocks run for the one request of SLOW_TOKENS video tokens, and holds its first block
    until past the deadline; the other blocks and requests run as usual."""

    def __init__(self, server: LiveServer):
        self.blocks = services_of(server).worker.pipeline.dit.blocks
        self.calls = 0
        self.started = threading.Event()

    def _before(self, module, args) -> None:
        if args[0].shape[1] == SLOW_TOKENS:
            self.calls += 1
            if self.calls == 1:
                self.started.set()
                time.sleep(DEADLINE_S + 1)

    def __enter__(self) -> SlowBlocks:
        self.handles = [block.register_forward_pre_hook(self._before) for block in self.blocks]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


def sync(server: LiveServer, **body) -> httpx.Response:
    return httpx.post(server.url + "/v1/videos/sync", json={"prompt": PROMPT, **body}, timeout=120)


def admit(config, settings: Settings | None = None, **params):
    settings = settings or Settings(model=config.name)
    generation = Generation(settings, None, None, None, config.name, config)
    return generation.engine_request(VideoCreateParams(prompt=PROMPT, **params), "req")


@pytest.mark.parametrize(
    ("config", "params"),
    [
        (TINY, {}),  # the default 64x64, 2 s
        (TINY, {"size": "1280x720", "seconds": 2}),
        (MODEL_PRESETS["apt-8b"], {"seconds": 5, "steps": 2}),
        (WAN_2STEP, {"size": "832x480", "seconds": 0.5}),
        (WAN_2STEP, {"size": "480x832", "seconds": 5}),  # Wan's own 81 frames
        (WAN_BASE, {}),  # 50 guided steps (100 passes) at 832x480 for 2 s
        (WAN_BASE, {"seconds": 5}),
    ],
)
def test_default_budget_admits_the_usual_requests(config, params):
    request = admit(config, **params)
    cost = request_cost(config, request.width, request.height, request.frames, request.steps)
    assert 0 < cost <= Settings(model="tiny").max_request_cost


def test_cost_counts_tokens_passes_attention_and_decoded_pixels():
    tokens = 13 * 45 * 80  # 720p x 49 frames: the paper's 46,800 tokens, where attention costs about the linears
    one_step = request_cost(MODEL_PRESETS["apt-8b"], 1280, 720, 49, 1)
    assert one_step == 2 * tokens + 49 * 1280 * 720 // 1024  # a decoded pixel: 1/1024 of a token (4x16x16)
    assert request_cost(MODEL_PRESETS["apt-8b"], 1280, 720, 49, 2) == one_step + 2 * tokens
    decoder = 33 * 832 * 480 // 1024
    per_pass = request_cost(WAN_2STEP, 832, 480, 33, 1) - decoder
    assert per_pass > 9 * 30 * 52  # 14,040 tokens, and their attention
    assert request_cost(WAN_2STEP, 832, 480, 33, 2) == 2 * per_pass + decoder  # a sigma list: a pass per step
    assert request_cost(WAN_BASE, 832, 480, 33, 50) == 100 * per_pass + decoder  # guided Euler: two per step


def test_the_largest_request_the_fields_allow_is_refused_for_its_cost(server):
    # The limits on pixels and seconds each allow this (601 frames, 543,600 tokens in one attention): hours on a CPU.
    body = {"prompt": PROMPT, "size": "1280x720", "seconds": 10, "fps": 60}
    response = httpx.post(server.url + "/v1/videos", json=body, timeout=30)
    assert response.status_code == 400
    error = response.json()["error"]
    estimate = request_cost(TINY, 1280, 720, frames_for_seconds(10, 60), 1)
    limit = services_of(server).settings.max_request_cost
    assert error["code"] == "request_too_costly" and error["type"] == "invalid_request_error"
    assert f"{estimate:,}" in error["message"] and f"{limit:,}" in error["message"]
    assert httpx.get(server.url + "/v1/videos").json()["data"] == []
    raised = Settings(model="tiny", max_request_cost=estimate)
    assert admit(TINY, raised, size="1280x720", seconds=10, fps=60).frames == 601
    with pytest.raises(APIError) as refused:
        admit(TINY, Settings(model="tiny", max_request_cost=estimate - 1), size="1280x720", seconds=10, fps=60)
    assert refused.value.status == 400 and refused.value.code == "request_too_costly"


@pytest.mark.parametrize("fps", [1, 4])
def test_low_frame_rates_complete_well_under_the_deadline(server, fps):
    # ffmpeg used to probe the raw input for 5 s of stream time: below 5 fps nothing came out until its 30 s timeout
    response = sync(server, fps=fps, seconds=2)
    assert response.status_code == 200, response.text
    assert decode(response.content) == (frames_for_seconds(2, fps), 64, 64, fps)


def test_the_deadline_stops_the_forward_pass_between_blocks(server):
    with SlowBlocks(server) as slow:
        response = sync(server, seconds=2)
    assert response.status_code == 504 and response.json()["error"]["code"] == "deadline_exceeded"
    assert slow.calls == 1, f"{slow.calls} of {len(slow.blocks)} blocks ran; the deadline passed in the first"
    assert metric(server, "aptserve_cancelled_total", reason="deadline") >= 1


def test_a_request_behind_a_timed_out_one_is_not_charged_its_time(server):
    with SlowBlocks(server) as slow, ThreadPoolExecutor(2) as pool:
        first = pool.submit(sync, server, seconds=2)
        assert slow.started.wait(30)
        behind = pool.submit(sync, server, seconds=1, seed=3)  # another shape: queued, not batched with the first
        assert first.result().status_code == 504
        response = behind.result()
    assert response.status_code == 200, response.text
    assert decode(response.content) == (25, 64, 64, 24)


class PolledPipeline:
    """Stands in for the pipeline: polls `cancelled` four times as if between generator blocks, then one chunk."""

    group = None  # one process: no sequence-parallel ranks

    def __init__(self, on_poll):
        self.on_poll = on_poll

    def complete_prompts(self, request):
        return request

    def num_chunks(self, request) -> int:
        return 1

    def generate(self, request, cancelled):
        for block in range(4):
            self.on_poll(block)
            assert not cancelled()
        yield FrameChunk(np.zeros((2, 1, 16, 16, 3), np.uint8), 0, 0, 1)


def test_a_ticket_stopped_mid_pass_is_answered_while_its_batch_goes_on():
    loop = asyncio.new_event_loop()
    tickets = [Ticket(EngineRequest(f"r{i}", PROMPT, i, 16, 16, 1), loop) for i in range(2)]
    answered_at = []

    def on_poll(block: int) -> None:
        if block == 1:
            tickets[1].cancel("client_cancel")
        if tickets[1].done and not answered_at:
            answered_at.append(block)

    worker = EngineWorker(lambda: None, Scheduler(max_queue=4, max_batch_size=2))
    worker.pipeline = PolledPipeline(on_poll)
    worker.run_batch(tickets)
    loop.run_until_complete(asyncio.sleep(0))
    events = [[t.events.get_nowait() for _ in range(t.events.qsize())] for t in tickets]
    loop.close()
    assert answered_at == [2]  # at the next poll, not after the pass of the ticket it shares a batch with
    assert isinstance(events[0][-1], Finished) and events[1][-1] == Failed(
        "r1", "client_cancel", "stopped during generation"
    )
