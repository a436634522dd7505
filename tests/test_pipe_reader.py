"""pipe.FrameReader: frames out of a byte stream however the reads cut it, with the one-read,
one-frame case (the hot path) sliced out of the read as it came, and the size check made
before a frame's body is buffered."""

from __future__ import annotations

import os
import threading

import pytest

from agent.exec import pipe

INVOKE = pipe.encode_frame(pipe.invoke_header("r-1"), b"args")
RESULT = pipe.encode_frame(pipe.result_header(2048), b"value")
LOAD = pipe.encode_frame({"op": "load", "function_id": "f"}, b"handler")

INVOKE_MSG = ({"op": pipe.INVOKE, "request_id": "r-1"}, b"args")
RESULT_MSG = ({"op": pipe.RESULT, "ok": True, "rss_kb": 2048}, b"value")
LOAD_MSG = ({"op": "load", "function_id": "f"}, b"handler")


def take_all(reader: pipe.FrameReader) -> list[tuple[dict[str, object], bytes]]:
    frames = []
    while (frame := reader.take()) is not None:
        frames.append(frame)
    return frames


@pytest.mark.parametrize(
    ("frame", "message"),
    [(INVOKE, INVOKE_MSG), (RESULT, RESULT_MSG), (LOAD, LOAD_MSG)],
    ids=["invoke", "result", "json"],
)
def test_one_read_one_frame(frame: bytes, message: tuple[dict[str, object], bytes]) -> None:
    reader = pipe.FrameReader()
    assert reader.take() is None
    reader.feed(frame)
    header, blob = reader.take() or ({}, b"")
    assert (header, blob) == message and type(blob) is bytes
    assert reader.take() is None


def test_one_frame_per_read_many_times() -> None:
    """The reader is empty again after each whole frame: the next read is the fast path too."""
    reader = pipe.FrameReader()
    for _ in range(3):
        reader.feed(INVOKE)
        assert reader.take() == INVOKE_MSG
        reader.feed(RESULT)
        assert reader.take() == RESULT_MSG


@pytest.mark.parametrize("cut", range(1, len(LOAD)))
def test_frame_split_across_two_reads_at_every_byte(cut: int) -> None:
    """Cut inside the prefix, the header or the blob: the frame comes out whole, once."""
    reader = pipe.FrameReader()
    reader.feed(LOAD[:cut])
    assert reader.take() is None
    reader.feed(LOAD[cut:])
    assert take_all(reader) == [LOAD_MSG]


def test_frame_fed_one_byte_at_a_time() -> None:
    reader = pipe.FrameReader()
    frames = []
    for i in range(len(RESULT)):
        reader.feed(RESULT[i : i + 1])
        frames += take_all(reader)
    assert frames == [RESULT_MSG]


def test_two_frames_in_one_read() -> None:
    reader = pipe.FrameReader()
    reader.feed(INVOKE + LOAD)
    assert take_all(reader) == [INVOKE_MSG, LOAD_MSG]


def test_a_read_that_ends_inside_the_second_frame() -> None:
    reader = pipe.FrameReader()
    both = RESULT + LOAD
    cut = len(RESULT) + 5
    reader.feed(both[:cut])
    assert take_all(reader) == [RESULT_MSG]
    reader.feed(both[cut:])
    assert take_all(reader) == [LOAD_MSG]
    reader.feed(INVOKE)  # and back to one read, one frame
    assert take_all(reader) == [INVOKE_MSG]


def test_frame_larger_than_one_read() -> None:
    """A 200 KiB blob in the pipe's 64 KiB reads: gathered, then the next read is whole."""
    blob = os.urandom(200 * 1024)
    frame = pipe.encode_frame(pipe.result_header(1), blob)
    reader = pipe.FrameReader()
    for start in range(0, len(frame), 1 << 16):
        assert reader.take() is None
        reader.feed(frame[start : start + (1 << 16)])
    assert take_all(reader) == [({"op": pipe.RESULT, "ok": True, "rss_kb": 1}, blob)]
    reader.feed(INVOKE)
    assert take_all(reader) == [INVOKE_MSG]


def test_feeding_a_bytearray_or_memoryview_is_copied() -> None:
    """Only exact bytes are kept as they came: a mutable chunk is copied before it changes."""
    reader = pipe.FrameReader()
    chunk = bytearray(INVOKE)
    reader.feed(chunk)  # type: ignore[arg-type]
    chunk[-1:] = b"X"
    assert take_all(reader) == [INVOKE_MSG]
    reader.feed(memoryview(RESULT))  # type: ignore[arg-type]
    assert take_all(reader) == [RESULT_MSG]


def test_frame_too_large_is_raised_from_the_prefix_alone() -> None:
    """FrameTooLarge as soon as the 8-byte prefix is in: the body is never waited for."""
    reader = pipe.FrameReader(max_frame=100)
    frame = pipe.encode_frame(pipe.result_header(1), b"x" * 200)
    reader.feed(frame[: pipe.PREFIX_SIZE])
    with pytest.raises(pipe.FrameTooLarge) as raised:
        reader.take()
    assert raised.value.size == len(frame) - pipe.PREFIX_SIZE and raised.value.limit == 100


def test_frame_too_large_in_one_read_and_after_a_whole_frame() -> None:
    reader = pipe.FrameReader(max_frame=100)
    big = pipe.encode_frame(pipe.result_header(1), b"x" * 200)
    reader.feed(INVOKE + big)
    assert reader.take() == INVOKE_MSG
    with pytest.raises(pipe.FrameTooLarge):
        reader.take()


def test_max_frame_set_later_applies_and_is_capped() -> None:
    reader = pipe.FrameReader()
    reader.max_frame = 10
    assert reader.max_frame == 10
    reader.feed(LOAD)
    with pytest.raises(pipe.FrameTooLarge):
        reader.take()
    reader.max_frame = pipe.MAX_FRAME * 4
    assert reader.max_frame == pipe.MAX_FRAME


def test_a_prefix_over_max_frame_is_not_a_frame() -> None:
    reader = pipe.FrameReader()
    reader.feed(b"\xff\xff\xff\xff\x00\x00\x00\x00")
    with pytest.raises(pipe.FrameError) as raised:
        reader.take()
    assert not isinstance(raised.value, pipe.FrameTooLarge)


@pytest.mark.parametrize(
    "head",
    [b"\xff not json", b"[1, 2]", b"", b"R12x", b"I\xff", b'{"op": "load"'],
    ids=["not-json", "not-an-object", "empty", "bad-rss", "bad-request-id", "truncated-json"],
)
def test_bad_headers_are_frame_errors(head: bytes) -> None:
    """The JSON header is parsed strictly, and so are the hot-path ones."""
    frame = pipe.encode_frame(head, b"blob")
    reader = pipe.FrameReader()
    reader.feed(frame)
    with pytest.raises(pipe.FrameError):
        reader.take()
    gathered = pipe.FrameReader()  # the same through the gathering path
    gathered.feed(frame[:3])
    gathered.feed(frame[3:])
    with pytest.raises(pipe.FrameError):
        gathered.take()
    with pytest.raises(pipe.FrameError):
        pipe.decode_body(frame[pipe.PREFIX_SIZE :], len(head))


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_decode_body_takes_any_buffer(kind: type) -> None:
    body = LOAD[pipe.PREFIX_SIZE :]
    head_len, _ = pipe.parse_prefix(LOAD)
    header, blob = pipe.decode_body(kind(body), head_len)
    assert (header, blob) == LOAD_MSG and type(blob) is bytes


def test_read_blocking_two_frames_in_one_read_then_eof() -> None:
    rfd, wfd = os.pipe()
    try:
        pipe.write_all(wfd, INVOKE + RESULT)
        os.close(wfd)
        reader = pipe.FrameReader()
        assert reader.read_blocking(rfd) == INVOKE_MSG
        assert reader.read_blocking(rfd) == RESULT_MSG
        with pytest.raises(pipe.FrameError) as raised:
            reader.read_blocking(rfd)
        assert raised.value.eof
    finally:
        os.close(rfd)


def test_write_all_writes_a_frame_bigger_than_the_pipe() -> None:
    """A frame over the pipe's buffer takes several writes; the reader gets it whole."""
    rfd, wfd = os.pipe()
    frame = pipe.encode_frame(pipe.result_header(7), os.urandom(300 * 1024))
    got: list[tuple[dict[str, object], bytes]] = []
    reader_thread = threading.Thread(
        target=lambda: got.append(pipe.FrameReader().read_blocking(rfd))
    )
    reader_thread.start()
    try:
        pipe.write_all(wfd, frame)
    finally:
        reader_thread.join(timeout=30)
        os.close(wfd)
        os.close(rfd)
    assert got and got[0][1] == frame[pipe.PREFIX_SIZE + len(b"R7") :]


def test_parse_prefix_refuses_over_max_frame_whatever_the_limit() -> None:
    prefix = b"\xff\xff\xff\xff\x00\x00\x00\x00"
    with pytest.raises(pipe.FrameError) as raised:
        pipe.parse_prefix(prefix, max_frame=1 << 40)
    assert not isinstance(raised.value, pipe.FrameTooLarge)
    with pytest.raises(pipe.FrameTooLarge):
        pipe.parse_prefix(LOAD, max_frame=4)
    assert pipe.parse_prefix(LOAD) == (len(LOAD) - pipe.PREFIX_SIZE - len(b"handler"), 7)
