"""Streaming H.264 fragmented-MP4 encoder over the ffmpeg binary bundled with `imageio-ffmpeg`.

RGB uint8 frame chunks go in; out come the init segment (ftyp+moov) and then one moof+mdat fragment per chunk, each
starting on an IDR frame so Media Source Extensions can append it. Imports only the stdlib, numpy and imageio_ffmpeg,
so the CLI can use it on machines without the web stack.

Latency, as measured: x264 with `-tune zerolatency` holds no frames back, but ffmpeg's mp4 muxer closes a fragment
only when the next keyframe (the first frame of the next chunk) reaches it, or at end of input. So writing chunk k
returns fragment k-1 (plus the init segment on the first write); the last fragment comes from `close()`.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import queue
import select
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise

import imageio_ffmpeg
import numpy as np

from aptserve.media.mp4 import BoxSplitter, codec_string

Frames = np.ndarray | Iterable[np.ndarray]  # one (F, H, W, 3) array, or chunks of them

# x264's own keyframe interval, set out of reach so keyframes (and so fragments) come only from the chunk schedule.
_NO_AUTO_KEYFRAMES = 1_000_000
_STDERR_KEEP = 8192  # bytes of ffmpeg's stderr kept for error messages
_POLL_S = 0.05  # how often a wait for output also looks at stderr


class EncoderError(RuntimeError):
    """ffmpeg failed, stalled, or the encoder was used after close/abort; the message carries ffmpeg's stderr tail."""


@dataclass(frozen=True)
class ChunkSchedule:
    """Frame indices where chunks start; each start is forced to an IDR frame and so opens a new fragment.

    The default follows the causal VAE's stream (1 frame, then 4 per latent frame): starts 0, 1, 5, 9, ...
    `starts` lists them explicitly instead (beginning with 0; the last chunk runs to the end of the video).
    """

    first: int = 1
    every: int = 4
    starts: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.first < 1 or self.every < 1:
            raise ValueError(f"chunk lengths must be >= 1, got first={self.first}, every={self.every}")
        if self.starts is not None and (
            not self.starts or self.starts[0] != 0 or any(b <= a for a, b in pairwise(self.starts))
        ):
            raise ValueError(f"chunk starts must begin at 0 and increase, got {self.starts}")

    def closed_fragments(self, frames_written: int) -> int:
        """Fragments the muxer has closed after `frames_written` frames: one per chunk start s, 0 < s < frames."""
        if self.starts is not None:
            return max(0, bisect.bisect_left(self.starts, frames_written) - 1)
        return max(0, -(-(frames_written - self.first) // self.every))

    def ffmpeg_expr(self) -> str:
        """The schedule as a `-force_key_frames` expression over the frame number n."""
        if self.starts is not None:
            return "expr:" + "+".join(f"eq(n,{s})" for s in self.starts)
        return f"expr:eq(n,0)+gte(n,{self.first})*eq(mod(n-{self.first},{self.every}),0)"


def ffmpeg_command(
    width: int, height: int, fps: float, crf: int, schedule: ChunkSchedule, extra_args: Sequence[str] = ()
) -> list[str]:
    """The ffmpeg command line: raw RGB frames on stdin, baseline H.264 fragmented MP4 on stdout."""
    return [
        imageio_ffmpeg.get_ffmpeg_exe(),
        *("-hide_banner", "-nostats", "-loglevel", "error"),
        # The raw input's format is given, yet ffmpeg would probe it for 5 s of stream time before encoding: below
        # 5 fps that is more frames than a streamed chunk, so nothing came out. The smallest probe ends it at once.
        *("-probesize", "32"),
        *("-f", "rawvideo", "-pix_fmt", "rgb24", "-video_size", f"{width}x{height}", "-framerate", str(fps)),
        *("-i", "pipe:0", "-an", "-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency"),
        # baseline so MSE takes it as avc1.42C0xx; no B-frames or scene cuts, so keyframes sit only at chunk starts
        *("-profile:v", "baseline", "-pix_fmt", "yuv420p", "-crf", str(crf), "-bf", "0", "-sc_threshold", "0"),
        *("-g", str(_NO_AUTO_KEYFRAMES), "-keyint_min", "1", "-forced-idr", "1"),
        *("-force_key_frames", schedule.ffmpeg_expr()),
        # skip_trailer: the mfra index would be a stray box after the last fragment and players do not need it
        *("-movflags", "empty_moov+default_base_moof+frag_keyframe+skip_trailer"),
        *extra_args,
        *("-f", "mp4", "pipe:1"),
    ]


def _drain_stdout(pipe, sink: queue.SimpleQueue) -> None:
    """Move ffmpeg's output into `sink` as it comes (None at EOF), so writing stdin can never deadlock on it."""
    while data := pipe.read(1 << 16):
        sink.put(data)
    sink.put(None)


def _drain_stderr(pipe, tail: bytearray) -> None:
    while data := pipe.read(1 << 12):
        tail += data
        del tail[:-_STDERR_KEEP]


class FragmentedMP4Encoder:
    """One ffmpeg process turning frame chunks into fMP4 pieces; started at construction so its start-up overlaps
    whatever produces the first frames. Call `close()` for the last fragment; leaving a `with` block without it
    aborts. `write` and `close` belong to one thread; `abort` may come from any thread.
    """

    def __init__(
        self,
        width: int,
        height: int,
        fps: float = 24,
        crf: int = 23,
        schedule: ChunkSchedule | None = None,
        timeout: float = 30.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        if width <= 0 or height <= 0 or width % 2 or height % 2:  # yuv420p halves both chroma axes
            raise ValueError(f"width and height must be positive and even, got {width}x{height}")
        if fps <= 0 or not 0 <= crf <= 51:
            raise ValueError(f"need fps > 0 and 0 <= crf <= 51, got fps={fps}, crf={crf}")
        self.width, self.height, self.fps, self.timeout = width, height, fps, timeout
        self.schedule = schedule or ChunkSchedule()
        self.frames_written = 0
        self.fragments_out = 0
        self.init_segment: bytes | None = None
        self._splitter = BoxSplitter()
        self._out: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._stderr_tail = bytearray()
        cmd = ffmpeg_command(width, height, fps, crf, self.schedule, extra_args)
        pipe = subprocess.PIPE
        self._proc = subprocess.Popen(cmd, stdin=pipe, stdout=pipe, stderr=pipe, bufsize=0)
        os.set_blocking(self._proc.stdin.fileno(), False)  # writes wait in select, which has a timeout
        # The threads hold the pipes, never self, so a forgotten encoder is still collected and ffmpeg gets EOF.
        self._stdout_thread = threading.Thread(target=_drain_stdout, args=(self._proc.stdout, self._out), daemon=True)
        self._stderr_thread = threading.Thread(
            target=_drain_stderr, args=(self._proc.stderr, self._stderr_tail), daemon=True
        )
        self._stdout_thread.start()
        self._stderr_thread.start()
        self._state = "open"  # last, so __del__ of a half-built encoder does nothing

    def __del__(self) -> None:
        # A forgotten encoder's output is unreachable, and Popen's own finalizer keeps stdin open, leaving ffmpeg
        # waiting for frames forever.
        if getattr(self, "_state", None) == "open":
            self.abort()

    def __enter__(self) -> FragmentedMP4Encoder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.abort()

    @property
    def mime_type(self) -> str:
        """MIME type for `MediaSource.addSourceBuffer`, known once the init segment has arrived."""
        if self.init_segment is None:
            raise EncoderError("no init segment yet: write the first frames before asking for the MIME type")
        return f'video/mp4; codecs="{codec_string(self.init_segment)}"'

    def write(self, frames: np.ndarray, wait: bool = True) -> list[bytes]:
        """Encode frames (F, H, W, 3) or one frame (H, W, 3); return the pieces (init segment, fragments) ready now.

        With `wait`, block (up to `timeout`) until every fragment these frames close has arrived: writing the chunk
        that starts at a schedule boundary returns the fragment of the chunk before it.
        """
        self._check_open()
        frames = self._check_frames(frames)
        self._send(memoryview(frames.reshape(-1)))  # flat bytes: slicing the view counts bytes
        self.frames_written += len(frames)
        return self._collect(block=wait)

    def close(self) -> list[bytes]:
        """End the input, wait for ffmpeg and return the remaining pieces (the last fragment at least)."""
        if self._state == "closed":
            return []
        self._check_open()
        self._proc.stdin.close()
        pieces = self._collect(block=True, until_eof=True)
        try:
            returncode = self._proc.wait(self.timeout)
            pieces += self._accept(self._splitter.finish())
        except (subprocess.TimeoutExpired, ValueError) as exc:
            raise self._failure(str(exc)) from None
        if returncode != 0:
            raise self._failure(f"ffmpeg exited with code {returncode}")
        self._reap()
        self._state = "closed"
        return pieces

    def abort(self) -> None:
        """Kill ffmpeg (cancellation); a write blocked in another thread then raises EncoderError."""
        if self._state != "open":
            return
        self._state = "aborted"
        self._kill()

    def _check_open(self) -> None:
        if self._state != "open":
            why = {"closed": "is closed", "aborted": "was aborted", "failed": "failed earlier"}[self._state]
            raise EncoderError(f"the encoder {why}: it takes no more frames")

    def _send(self, view: memoryview) -> None:
        """Write all of `view` to ffmpeg's (non-blocking) stdin; fail once it has taken nothing for `timeout` s, so a
        stalled ffmpeg cannot hold the writing thread."""
        stdin = self._proc.stdin
        try:
            while view:  # a pipe write may take only part of a large chunk
                if not select.select([], [stdin], [], self.timeout)[1]:
                    raise self._failure(f"ffmpeg took no frames within {self.timeout} s")
                view = view[stdin.write(view) or 0 :]  # None: the pipe filled up again since select
        except (OSError, ValueError):  # ValueError: abort() closed stdin from another thread
            raise self._failure("ffmpeg stopped reading frames") from None

    def _check_frames(self, frames: np.ndarray) -> np.ndarray:
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8, got {frames.dtype}")
        if frames.ndim != 4 or frames.shape[1:] != (self.height, self.width, 3):
            raise ValueError(f"frames must be (F, {self.height}, {self.width}, 3) RGB, got {frames.shape}")
        return np.ascontiguousarray(frames)

    def _waiting(self) -> bool:
        """True while a piece that the frames written so far complete has not arrived yet."""
        if self.frames_written and self.init_segment is None:
            return True
        return self.fragments_out < self.schedule.closed_fragments(self.frames_written)

    def _collect(self, block: bool, until_eof: bool = False) -> list[bytes]:
        """Take ffmpeg's output so far; with `block`, wait for the expected pieces (or EOF) up to `timeout`."""
        pieces: list[bytes] = []
        deadline = time.monotonic() + self.timeout
        while True:
            must_wait = block and (until_eof or self._waiting())
            data = self._next_output(deadline if must_wait else None, until_eof)
            if data is None:
                return pieces
            try:
                pieces += self._accept(self._splitter.feed(data))
            except ValueError as exc:
                raise self._failure(str(exc)) from None

    def _next_output(self, deadline: float | None, until_eof: bool) -> bytes | None:
        """Next bytes from ffmpeg's stdout; None if none are there yet (no deadline) or at EOF (`until_eof`)."""
        while True:
            if self._stderr_tail and not until_eof:
                # At -loglevel error anything on stderr is fatal, and ffmpeg whose encoder failed to open lingers
                # until its stdin ends, so waiting for it to exit would only run into the timeout.
                raise self._failure("ffmpeg reported an error")
            try:
                data = self._out.get(timeout=_POLL_S) if deadline is not None else self._out.get_nowait()
            except queue.Empty:
                if deadline is None:
                    return None
                if time.monotonic() > deadline:
                    raise self._failure(f"no output from ffmpeg within {self.timeout} s") from None
                continue
            if data is None and not until_eof:
                raise self._failure("ffmpeg exited before the input ended")
            return data

    def _accept(self, pieces: list[bytes]) -> list[bytes]:
        for piece in pieces:
            if self.init_segment is None:
                self.init_segment = piece
            else:
                self.fragments_out += 1
        return pieces

    def _kill(self) -> int:
        if self._proc.poll() is None:
            self._proc.kill()
        with contextlib.suppress(OSError):  # nothing to flush to a dead process; the pipe is closed all the same
            self._proc.stdin.close()
        returncode = self._proc.wait()
        self._reap()
        return returncode

    def _reap(self) -> None:
        """Close the output pipes once their threads have read EOF; closing under a reading thread races."""
        self._stdout_thread.join(timeout=5.0)
        self._stderr_thread.join(timeout=5.0)
        self._proc.stdout.close()
        self._proc.stderr.close()

    def _failure(self, reason: str) -> EncoderError:
        """Stop ffmpeg for good and describe why, with the tail of its stderr."""
        aborted = self._state == "aborted"
        self._state = "aborted" if aborted else "failed"
        returncode = self._kill()
        lines = self._stderr_tail.decode(errors="replace").strip().splitlines()
        tail = "\n".join(lines[-20:]) or "(no stderr)"
        if aborted:
            reason = "encoder was aborted"
        return EncoderError(f"{reason} (ffmpeg exit code {returncode}):\n{tail}")


def _encode_pieces(chunks: Frames, width: int, height: int, fps: float, crf: int) -> Iterator[bytes]:
    if isinstance(chunks, np.ndarray):
        chunks = [chunks]
    with FragmentedMP4Encoder(width, height, fps, crf) as encoder:
        for chunk in chunks:
            yield from encoder.write(chunk, wait=False)  # no need to wait for pieces when only the whole file counts
        if encoder.frames_written == 0:
            raise ValueError("no frames to encode")
        yield from encoder.close()


def encode_mp4(frames: Frames, width: int, height: int, fps: float = 24, crf: int = 23) -> bytes:
    """Encode frames (one (F, H, W, 3) array or an iterable of chunks) to a whole fragmented MP4 file in memory."""
    return b"".join(_encode_pieces(frames, width, height, fps, crf))


def write_mp4(
    path: str | os.PathLike[str], chunks: Frames, width: int, height: int, fps: float = 24, crf: int = 23
) -> int:
    """Encode chunks to a fragmented MP4 file, writing pieces as they come; return the number of bytes written."""
    written = 0
    with open(path, "wb") as file:
        for piece in _encode_pieces(chunks, width, height, fps, crf):
            written += file.write(piece)
    return written
