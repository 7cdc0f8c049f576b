"""Tests for the streaming fMP4 encoder: every MP4 is decoded back with PyAV and checked frame by frame."""

import gc
import io
import os
import signal
import subprocess
import sys
import threading
from itertools import pairwise
from pathlib import Path

import av
import numpy as np
import pytest

from aptserve.media.encoder import ChunkSchedule, EncoderError, FragmentedMP4Encoder, encode_mp4, write_mp4
from aptserve.media.mp4 import BoxSplitter, codec_string, iter_boxes

VAE_CHUNKS = [1] + [4] * 12  # 49 frames, as the causal VAE streams them
MAX_MEAN_ABS_ERROR = 8.0  # on 0..255; crf 23 on these smooth patterns lands near 1


def pattern(frames: int, height: int, width: int) -> np.ndarray:
    """Smooth frames that differ over time: a moving horizontal ramp in red, a vertical one in green, flat blue."""
    f, y, x = np.meshgrid(np.arange(frames), np.arange(height), np.arange(width), indexing="ij")
    red = (x * 255 // max(width - 1, 1) + 5 * f) % 256
    green = y * 255 // max(height - 1, 1)
    blue = np.broadcast_to((40 + 4 * np.arange(frames))[:, None, None], f.shape)
    return np.stack([red, green, blue], axis=-1).astype(np.uint8)  # (F, H, W, 3)


def decode(data: bytes) -> tuple[np.ndarray, av.video.stream.VideoStream, list[bool]]:
    """Frames (F, H, W, 3), the video stream, and each packet's keyframe flag."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        keyframes, frames = [], []
        for packet in container.demux(stream):
            if packet.size:
                keyframes.append(packet.is_keyframe)
            frames += [frame.to_ndarray(format="rgb24") for frame in packet.decode()]
    return np.stack(frames), stream, keyframes


def box_types(data: bytes) -> list[str]:
    return [kind for kind, _ in iter_boxes(data)]


def stream_chunks(frames: np.ndarray, sizes: list[int], **kwargs) -> tuple[list[bytes], list[tuple[str, int]]]:
    """Write `frames` chunk by chunk; return all pieces and the event order (('write', k) / ('piece', k))."""
    height, width = frames.shape[1:3]
    events, pieces = [], []
    starts = np.cumsum([0, *sizes])
    with FragmentedMP4Encoder(width, height, **kwargs) as encoder:
        for k, (start, stop) in enumerate(pairwise(starts)):
            events.append(("write", k))
            for piece in encoder.write(frames[start:stop]):
                events.append(("piece", len(pieces)))
                pieces.append(piece)
        events.append(("close", len(sizes)))
        for piece in encoder.close():
            events.append(("piece", len(pieces)))
            pieces.append(piece)
    return pieces, events


@pytest.fixture(scope="module")
def streamed() -> tuple[np.ndarray, list[bytes], list[tuple[str, int]]]:
    frames = pattern(49, 64, 64)
    pieces, events = stream_chunks(frames, VAE_CHUNKS)
    return frames, pieces, events


def test_whole_file_round_trip():
    frames = pattern(49, 64, 80)
    decoded, stream, _ = decode(encode_mp4(frames, width=80, height=64))
    assert decoded.shape == frames.shape
    assert (stream.width, stream.height) == (80, 64)
    assert stream.average_rate == 24
    assert np.abs(decoded.astype(float) - frames).mean() < MAX_MEAN_ABS_ERROR


def test_solid_colours_survive():
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128], [20, 200, 90]], np.uint8)
    frames = np.broadcast_to(colours[:, None, None, :], (5, 32, 48, 3))
    decoded, _, _ = decode(encode_mp4(frames, width=48, height=32))
    assert np.abs(decoded.astype(float) - frames).mean(axis=(1, 2, 3)).max() < MAX_MEAN_ABS_ERROR


def test_delivers_bytes_before_input_ends(streamed):
    _, pieces, events = streamed
    assert box_types(pieces[0]) == ["ftyp", "moov"]
    assert all(box_types(piece) == ["moof", "mdat"] for piece in pieces[1:])
    assert len(pieces) == 1 + len(VAE_CHUNKS)
    last_write = events.index(("write", len(VAE_CHUNKS) - 1))
    assert events.index(("piece", 0)) < events.index(("write", 1))  # init segment right after the first frame
    assert events.index(("piece", 1)) < last_write  # first fragment while most input is still to come
    decoded, _, _ = decode(b"".join(pieces))
    assert len(decoded) == 49


def test_writing_chunk_k_returns_fragment_k_minus_1(streamed):
    _, _, events = streamed
    # the muxer closes a fragment when the next chunk's keyframe reaches it; the last one comes from close()
    expected = [("write", 0), ("piece", 0)]
    for k in range(1, len(VAE_CHUNKS)):
        expected += [("write", k), ("piece", k)]
    expected += [("close", len(VAE_CHUNKS)), ("piece", len(VAE_CHUNKS))]
    assert events == expected


def test_each_fragment_starts_on_a_keyframe(streamed):
    frames, pieces, _ = streamed
    init, fragments = pieces[0], pieces[1:]
    start = 0
    for fragment, size in zip(fragments, VAE_CHUNKS):
        decoded, _, keyframes = decode(init + fragment)  # alone: decodable only if it opens with an IDR frame
        assert keyframes == [True] + [False] * (size - 1)
        assert len(decoded) == size
        assert np.abs(decoded.astype(float) - frames[start : start + size]).mean() < MAX_MEAN_ABS_ERROR
        start += size


def test_other_size_fps_and_chunking():
    frames = pattern(25, 64, 96)
    pieces, _ = stream_chunks(frames, [1, 8, 8, 8], fps=12, schedule=ChunkSchedule(first=1, every=8))
    assert len(pieces) == 1 + 4
    decoded, stream, keyframes = decode(b"".join(pieces))
    assert decoded.shape == (25, 64, 96, 3)
    assert stream.average_rate == 12
    assert [i for i, key in enumerate(keyframes) if key] == [0, 1, 9, 17]


@pytest.mark.parametrize("fps", [1, 2, 4])
def test_low_frame_rates_stream_each_fragment_without_stalling(fps: int):
    # ffmpeg used to probe its raw input for seconds of stream time, emitting nothing until the timeout at fps < 5
    frames = pattern(9, 64, 64)
    pieces, events = stream_chunks(frames, [1, 4, 4], fps=fps, timeout=10)
    writes = [("write", 0), ("piece", 0), ("write", 1), ("piece", 1), ("write", 2), ("piece", 2)]
    assert events == [*writes, ("close", 3), ("piece", 3)]  # each fragment as the next chunk arrives, not at the end
    decoded, stream, _ = decode(b"".join(pieces))
    assert decoded.shape == (9, 64, 64, 3) and stream.average_rate == fps


def test_a_stalled_ffmpeg_fails_the_write_instead_of_holding_its_thread():
    encoder = FragmentedMP4Encoder(64, 64, timeout=1)
    os.kill(encoder._proc.pid, signal.SIGSTOP)  # ffmpeg alive but reading nothing: the stdin pipe fills up
    outcome = []

    def write() -> None:
        try:
            encoder.write(pattern(40, 64, 64))  # ~490 kB, far past a pipe buffer
        except EncoderError as exc:
            outcome.append(exc)

    writer = threading.Thread(target=write)
    writer.start()
    writer.join(20)
    stuck = writer.is_alive()
    encoder.abort()  # frees a stuck writer, so a failure here does not leave a thread behind
    writer.join(20)
    assert not stuck, "the write blocked past the encoder's timeout"
    assert "took no frames within 1 s" in str(outcome[0]) and encoder._proc.poll() is not None


def test_explicit_schedule_and_single_frames():
    schedule = ChunkSchedule(starts=(0, 3, 4))
    assert [schedule.closed_fragments(n) for n in range(7)] == [0, 0, 0, 0, 1, 2, 2]
    frames = pattern(7, 32, 32)
    with FragmentedMP4Encoder(32, 32, schedule=schedule) as encoder:
        pieces = [p for frame in frames for p in encoder.write(frame)] + encoder.close()
        assert encoder.mime_type.startswith('video/mp4; codecs="avc1.42C0')
    assert codec_string(pieces[0]) == encoder.mime_type.split('"')[1]
    _, _, keyframes = decode(b"".join(pieces))
    assert [i for i, key in enumerate(keyframes) if key] == [0, 3, 4]


def test_write_mp4_streams_chunks_to_a_file(tmp_path: Path):
    frames = pattern(9, 32, 32)
    path = tmp_path / "clip.mp4"
    written = write_mp4(path, iter([frames[:1], frames[1:5], frames[5:]]), width=32, height=32, fps=24)
    assert written == path.stat().st_size
    decoded, _, _ = decode(path.read_bytes())
    assert len(decoded) == 9


def test_box_splitter_is_indifferent_to_how_bytes_arrive(streamed):
    _, pieces, _ = streamed
    data = b"".join(pieces)
    splitter = BoxSplitter()
    bytewise = [p for i in range(0, len(data), 7) for p in splitter.feed(data[i : i + 7])] + splitter.finish()
    assert bytewise == pieces
    splitter.feed(data[:-3])
    with pytest.raises(ValueError, match="ends inside a box"):
        splitter.finish()
    with pytest.raises(ValueError, match="ends inside a box"):
        list(iter_boxes(data[:-3]))


@pytest.mark.parametrize(("width", "height"), [(63, 64), (64, 0), (-2, 64)])
def test_bad_size_raises(width: int, height: int):
    with pytest.raises(ValueError, match=f"{width}x{height}"):
        FragmentedMP4Encoder(width, height)


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        (np.zeros((2, 32, 32, 3), np.float32), "uint8"),
        (np.zeros((2, 32, 30, 3), np.uint8), r"\(F, 32, 32, 3\).*\(2, 32, 30, 3\)"),
        (np.zeros((2, 32, 32, 4), np.uint8), "RGB"),
        (np.zeros((32, 32), np.uint8), "RGB"),
    ],
)
def test_bad_frames_raise(frames: np.ndarray, message: str):
    with FragmentedMP4Encoder(32, 32) as encoder, pytest.raises(ValueError, match=message):
        encoder.write(frames)


def test_bad_schedule_and_empty_input_raise():
    with pytest.raises(ValueError, match="increase"):
        ChunkSchedule(starts=(0, 4, 4))
    with pytest.raises(ValueError, match="begin at 0"):
        ChunkSchedule(starts=(1, 5))
    with pytest.raises(ValueError, match="first=0"):
        ChunkSchedule(first=0)
    with pytest.raises(ValueError, match="no frames"):
        encode_mp4([], width=32, height=32)


def test_failing_ffmpeg_raises_with_its_stderr():
    with FragmentedMP4Encoder(32, 32, extra_args=["-profile:v", "no-such-profile"], timeout=10) as encoder:
        with pytest.raises(EncoderError, match=r"(?i)profile"):
            encoder.write(np.zeros((1, 32, 32, 3), np.uint8))
        with pytest.raises(EncoderError, match="failed"):
            encoder.write(np.zeros((1, 32, 32, 3), np.uint8))


def test_use_after_close_or_abort_raises():
    frame = np.zeros((1, 32, 32, 3), np.uint8)
    encoder = FragmentedMP4Encoder(32, 32)
    encoder.write(frame)
    assert len(encoder.close()) == 1  # the one fragment; the init segment came with the write
    assert encoder.close() == []
    with pytest.raises(EncoderError, match="closed"):
        encoder.write(frame)
    encoder = FragmentedMP4Encoder(32, 32)
    encoder.abort()
    with pytest.raises(EncoderError, match="aborted"):
        encoder.write(frame)
    with pytest.raises(EncoderError, match="aborted"):
        encoder.close()


def test_empty_write_and_forgotten_encoder():
    encoder = FragmentedMP4Encoder(32, 32)
    assert encoder.write(np.zeros((0, 32, 32, 3), np.uint8)) == []
    process = encoder._proc
    del encoder
    gc.collect()
    assert process.poll() is not None  # ffmpeg does not linger waiting for frames that will never come


def test_import_stays_off_the_web_stack():
    code = (
        "import sys, aptserve.media.encoder; print(sorted({'fastapi', 'torch', 'av', 'pydantic'} & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
