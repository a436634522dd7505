"""The pipe's framing under its old name: everything now lives in :mod:`agent.pipe`."""

from agent.pipe import (
    MAX_FRAME,
    PREFIX_SIZE,
    FrameError,
    FrameReader,
    FrameTooLarge,
    decode_body,
    encode_frame,
    invoke_header,
    parse_prefix,
    read_frame_blocking,
    result_header,
    write_all,
)

__all__ = [
    "MAX_FRAME",
    "PREFIX_SIZE",
    "FrameError",
    "FrameReader",
    "FrameTooLarge",
    "decode_body",
    "encode_frame",
    "invoke_header",
    "parse_prefix",
    "read_frame_blocking",
    "result_header",
    "write_all",
]
