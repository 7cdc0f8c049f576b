import numpy as np
import pytest

from aptserve.engines.config import frames_for_seconds, parse_size
from aptserve.engines.pipeline import Cancelled, GenerationRequest

PROMPT = "a red circle moving left"


def test_two_seconds_is_49_frames_in_chunks_of_1_then_4(tiny_pipeline):
    request = tiny_pipeline.request(PROMPT, seeds=0, seconds=2.0)
    chunks = list(tiny_pipeline.generate(request))
    assert [c.frames.shape[1] for c in chunks] == [1] + [4] * 12
    assert [c.start_frame for c in chunks] == [0] + [1 + 4 * i for i in range(12)]
    assert chunks[-1].is_last and not chunks[0].is_last
    assert chunks[0].frames.shape == (1, 1, 64, 64, 3) and chunks[0].frames.dtype == np.uint8
    decode_times = [c.timings["vae_decode"] for c in chunks]
    assert decode_times == sorted(decode_times) and set(chunks[-1].timings) == {"text_encode", "dit", "vae_decode"}


def test_same_seed_same_video_other_seed_different(tiny_pipeline):
    video_a, _ = tiny_pipeline.generate_video(tiny_pipeline.request(PROMPT, seeds=7, seconds=1.0))
    video_b, _ = tiny_pipeline.generate_video(tiny_pipeline.request(PROMPT, seeds=7, seconds=1.0))
    video_c, _ = tiny_pipeline.generate_video(tiny_pipeline.request(PROMPT, seeds=8, seconds=1.0))
    assert video_a.shape == (1, 25, 64, 64, 3)
    assert np.array_equal(video_a, video_b)
    assert np.abs(video_a.astype(int) - video_c.astype(int)).mean() > 5


def test_a_sample_does_not_depend_on_its_batch(tiny_pipeline):
    batch, _ = tiny_pipeline.generate_video(
        tiny_pipeline.request([PROMPT, "a blue square moving up"], seeds=[1, 2], size="96x64", seconds=0.5)
    )
    alone, _ = tiny_pipeline.generate_video(
        tiny_pipeline.request(["a blue square moving up"], seeds=[2], size="96x64", seconds=0.5)
    )
    assert batch.shape == (2, 13, 64, 96, 3)
    assert np.abs(batch[1].astype(int) - alone[0].astype(int)).max() <= 1  # fp32 batched matmuls may differ by 1 ulp


def test_cancellation_between_chunks(tiny_pipeline):
    request = tiny_pipeline.request(PROMPT, seeds=0, seconds=1.0)
    seen = []
    with pytest.raises(Cancelled):
        for chunk in tiny_pipeline.generate(request, cancelled=lambda: len(seen) >= 2):
            seen.append(chunk)
    assert len(seen) == 2
    with pytest.raises(Cancelled):
        next(tiny_pipeline.generate(request, cancelled=lambda: True))


def test_cancellation_inside_the_generator_pass(tiny_pipeline):
    request = tiny_pipeline.request(PROMPT, seeds=0, seconds=1.0)
    polls = []

    def cancelled() -> bool:  # polled after text encoding, then after every generator block
        polls.append(len(polls))
        return len(polls) == 3

    with pytest.raises(Cancelled):
        next(tiny_pipeline.generate(request, cancelled))
    assert len(polls) == 3 < 1 + len(tiny_pipeline.dit.blocks)
    assert tiny_pipeline.dit.between_blocks is None  # the hook lives only as long as its request's pass
    assert len(list(tiny_pipeline.generate(request))) == 7


def test_two_step_and_teacher_sampling_run(tiny_pipeline):
    one, _ = tiny_pipeline.generate_video(tiny_pipeline.request(PROMPT, seeds=0, seconds=0.5, steps=1))
    two, _ = tiny_pipeline.generate_video(tiny_pipeline.request(PROMPT, seeds=0, seconds=0.5, steps=2))
    many, _ = tiny_pipeline.generate_video(
        tiny_pipeline.request(PROMPT, seeds=0, seconds=0.5, steps=4, guidance_scale=3.0)
    )
    assert one.shape == two.shape == many.shape
    assert not np.array_equal(one, two) and not np.array_equal(one, many)


def test_durations_follow_four_latents_minus_three():
    assert frames_for_seconds(2.0, 24) == 49
    assert frames_for_seconds(1.0, 24) == 25
    assert frames_for_seconds(4.0, 24) == 97
    assert frames_for_seconds(0.01, 24) == 5
    with pytest.raises(ValueError):
        frames_for_seconds(0, 24)


def test_bad_requests_raise(tiny_pipeline):
    with pytest.raises(ValueError, match="multiples of 16"):
        tiny_pipeline.request(PROMPT, size="100x64")
    with pytest.raises(ValueError, match=r"width x height"):
        parse_size("big")
    with pytest.raises(ValueError, match="one seed per prompt"):
        GenerationRequest(["a", "b"], [1], 64, 64, 49)
    with pytest.raises(ValueError, match="4\\*k \\+ 1"):
        GenerationRequest(["a"], [1], 64, 64, 48)
