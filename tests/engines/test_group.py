"""ParallelGroup (`aptserve serve --sp N`): one pipeline whose generator passes and decode chunks run on real gloo
ranks in child processes, against the same pipeline in one process: 2 ranks (Ulysses over the tiny model's 4 heads)
and 3 (a degree that does not divide the heads: a ring over all three). Then the group's life: a cancel inside a pass
leaves every rank in step, a rank killed inside a pass fails that pass naming the rank and the signal, a rank that dies
while idle is noticed, a rank that cannot load stops the start with its own error, and a restarted group serves the
same frames again."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import torch

from aptserve.engines.group import GroupFailed, ParallelGroup, RankSpec
from aptserve.engines.pipeline import Cancelled, Pipeline

ATOL = 1e-4
PROMPTS, SEEDS = ["a red circle moving left", "a blue square"], [3, 4]
SIZE = "64x48"  # 6 latent rows: 3 per rank on 2 ranks, 2 on 3


@pytest.fixture(scope="module")
def reference() -> Pipeline:
    return Pipeline.from_name("tiny")


def grouped(size: int, model: str = "tiny") -> tuple[Pipeline, ParallelGroup]:
    pipeline = Pipeline.from_name("tiny")
    group = ParallelGroup(RankSpec(model, threads=1), size, timeout_s=60)
    group.attach(pipeline)
    return pipeline, group


@pytest.fixture(params=[2, 3], ids=["2-ranks", "3-ranks"])  # one group per process at a time: not shared
def group_of(request):
    pipeline, group = grouped(request.param)
    yield pipeline, group
    group.close()


def request_of(pipeline: Pipeline, seconds: float = 1.0):
    return pipeline.request(PROMPTS, SEEDS, SIZE, seconds)


def assert_same_frames(a: np.ndarray, b: np.ndarray) -> None:
    """uint8 frames of fp32 runs that agree to ~1e-6: equal, but for a rounding flip at a pixel here and there."""
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert a.shape == b.shape and diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())


def test_group_runs_the_pipeline_as_one_process(reference, group_of):
    pipeline, group = group_of
    request = request_of(reference)
    with torch.inference_mode():
        text, mask = reference.encode_text(request.prompts)
        x = torch.randn(2, *reference.latent_shape(request), generator=torch.Generator().manual_seed(0))
        t = torch.tensor([1.0, 0.6])
        velocity = pipeline.dit(x, t, text, mask)
        assert (velocity - reference.dit(x, t, text, mask)).abs().max() < ATOL
        ours, theirs = pipeline.vae.init_decode_cache(), reference.vae.init_decode_cache()
        for index in range(x.shape[2]):  # streamed, chunk by chunk, each rank keeping its own rows' cache
            a, ours = pipeline.vae.decode_chunk(x[:, :, index : index + 1], ours)
            b, theirs = reference.vae.decode_chunk(x[:, :, index : index + 1], theirs)
            assert (a - b).abs().max() < ATOL, index
    assert_same_frames(pipeline.generate_video(request)[0], reference.generate_video(request)[0])
    assert group.healthy() and group.restarts == 0


def test_cancel_inside_a_pass_keeps_the_ranks_in_step(reference, group_of):
    pipeline, group = group_of
    request = request_of(pipeline)
    checks = []

    def cancelled() -> bool:  # polled after every generator block: stop after the first
        checks.append(1)
        return len(checks) >= 2

    with pytest.raises(Cancelled):
        list(pipeline.generate(request, cancelled))
    assert len(checks) == 2  # text encode, then the first block: the pass stopped inside
    assert group.healthy()
    assert_same_frames(pipeline.generate_video(request)[0], reference.generate_video(request)[0])


def test_a_rank_killed_inside_a_pass_fails_it_and_a_restart_serves_again(reference):
    pipeline, group = grouped(2)
    try:
        request = request_of(pipeline)
        victim = group.pids()[0]

        def kill_rank_1() -> bool:  # inside the generator pass, after its first block
            if group.pids() and group.pids()[0] == victim:
                os.kill(victim, signal.SIGKILL)
                time.sleep(0.2)
            return False

        with pytest.raises(GroupFailed, match=r"rank 1 was killed \(SIGKILL\)"):
            list(pipeline.generate(request, kill_rank_1))
        assert not group.healthy()
        with pytest.raises(GroupFailed, match="SIGKILL"):  # a broken group refuses work until it restarts
            pipeline.generate_video(request)

        group.restart()
        assert group.healthy() and group.restarts == 1 and group.pids()[0] != victim
        assert_same_frames(pipeline.generate_video(request)[0], reference.generate_video(request)[0])

        idle = group.pids()[0]  # a rank that dies between requests is noticed before the next one
        os.kill(idle, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while group.healthy() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert group.failure is not None and "rank 1 was killed (SIGTERM)" in group.failure
        group.restart()
        assert_same_frames(pipeline.generate_video(request)[0], reference.generate_video(request)[0])
    finally:
        group.close()
    assert not any(p.is_alive() for p in group._procs)


def test_a_rank_that_cannot_load_stops_the_start_with_its_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(GroupFailed, match=r"rank 1 failed while loading: .*no-such-model"):
        grouped(2, model=str(missing))


def test_a_group_needs_two_ranks_and_the_gpus_it_names():
    with pytest.raises(ValueError, match="2 or more ranks"):
        ParallelGroup(RankSpec("tiny"), 1)
    if torch.cuda.device_count() < 64:
        with pytest.raises(ValueError, match="need 64 GPUs"):
            ParallelGroup(RankSpec("tiny", device="cuda"), 64)
