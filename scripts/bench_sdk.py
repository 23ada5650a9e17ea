#!/usr/bin/env python3
"""Baseline of the "SSE parse vs Python SDK" row of scripts/bench.

Feeds the fixture streams (fixtures/anthropic/*.sse, repeated to --mb
megabytes) through the official `anthropic` SDK's own SSE decoding and
message accumulation, with no network: each stream becomes an in-memory
HTTP response that the SDK's `Stream` decodes (its `SSEDecoder`, JSON and
event construction, as `client.messages.stream()` does) and its
`MessageStream` accumulates into a message (`accumulate_event`,
`build_events`) until `get_final_message()`. One stream is one message:
the accumulator starts afresh for each. A stream that carries an `error`
event raises in the SDK, as it would for a real response; its bytes count
all the same (the Rust figure parses them too).

Prints one JSON object: {"mb_per_s", "mb", "seconds", "streams",
"events", "errors", "sdk_version", "python"}.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import anthropic
from anthropic._streaming import Stream
from anthropic.lib.streaming import MessageStream
from anthropic.types import RawMessageStreamEvent

try:  # The SDK moved from httpx to its fork httpx2; use whichever it uses.
    import httpx2 as httpx  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - older SDKs
    import httpx  # type: ignore[no-redef]

try:
    from anthropic import not_given as NOT_GIVEN  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - older SDKs
    from anthropic import NOT_GIVEN

def streams(fixtures: Path) -> list[bytes]:
    """Every fixture stream's bytes, in name order."""
    return [p.read_bytes() for p in sorted((fixtures / "anthropic").glob("*.sse"))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixtures", default="fixtures", type=Path)
    ap.add_argument("--mb", default=5.0, type=float, help="megabytes of SSE to accumulate")
    args = ap.parse_args()

    one = streams(args.fixtures)
    if not one:
        print(json.dumps({"error": f"no .sse files in {args.fixtures / 'anthropic'}"}))
        return 1
    target = int(args.mb * 1_048_576)
    corpus: list[bytes] = []
    size = 0
    while size < target:
        for s in one:
            corpus.append(s)
            size += len(s)

    client = anthropic.Anthropic(api_key="bench", base_url="http://127.0.0.1:9")
    request = httpx.Request("POST", "http://127.0.0.1:9/v1/messages")
    headers = {"content-type": "text/event-stream"}

    events = 0
    errors = 0
    start = time.perf_counter()
    for body in corpus:
        response = httpx.Response(200, headers=headers, stream=httpx.ByteStream(body), request=request)
        raw = Stream(cast_to=RawMessageStreamEvent, response=response, client=client)
        stream = MessageStream(raw, output_format=NOT_GIVEN)
        try:
            for _ in stream:
                events += 1
            stream.get_final_message()
        except anthropic.APIStatusError:
            errors += 1
    seconds = time.perf_counter() - start
    mb = size / 1_048_576
    print(
        json.dumps(
            {
                "mb_per_s": mb / seconds,
                "mb": mb,
                "seconds": seconds,
                "streams": len(corpus),
                "events": events,
                "errors": errors,
                "sdk_version": anthropic.__version__,
                "python": platform.python_version(),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
