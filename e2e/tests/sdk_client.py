#!/usr/bin/env python3
"""Drives relay with the official Anthropic Python SDK, used as is, for e2e/tests/sdk.rs.

Reads ANTHROPIC_BASE_URL (a relay data plane) and ANTHROPIC_API_KEY (a relay key) from the
environment, like any SDK user. Makes these calls:

- create:        messages.create, non-streaming, with 5m and 1h cache marks and x-mock-cache-read
- raw_stream:    messages.with_streaming_response.create(stream=True): the raw SSE bytes as received
- stream_helper: messages.stream with adaptive thinking: the accumulated final message
- tool_use:      messages.create with tools: a tool_use block with its parsed input
- tool_stream:   messages.stream with tools: the input assembled from input_json_delta events
- count_tokens:  messages.count_tokens
- models:        models.list (one page, and auto-paginated two at a time) and models.retrieve

Every HTTP exchange is logged through httpx event hooks (method, path, the JSON body sent, the
x-mock-cache-read header, status, relay's request-id and the upstream's x-upstream-request-id).
Prints ONE JSON object on stdout: {"sdk_version", "exchanges": [...], "calls": {...}}; each call
holds the index of its exchange, the body it sent, the upstream request id and what the SDK
parsed. Exits 1 with a message on stderr on any failure.
"""

import base64
import json
import os
import sys
import traceback
import urllib.parse


def fail(message):
    print(f"sdk_client.py: {message}", file=sys.stderr)
    sys.exit(1)


try:
    import anthropic
except ImportError as e:
    fail(
        f"cannot import the official Anthropic SDK ({e}): run scripts/test.sh, which installs it "
        "(or: python3 -m pip install anthropic)"
    )

MODEL = "claude-sonnet-4-5"
CACHE_READ = 100

exchanges = []
by_request = {}


def auth_scheme(headers):
    key = os.environ.get("ANTHROPIC_API_KEY")
    if headers.get("x-api-key") == key:
        return "x-api-key"
    if headers.get("authorization") == f"Bearer {key}":
        return "bearer"
    return None


def on_request(request):
    raw = request.read()
    body = json.loads(raw) if raw else None
    url = urllib.parse.urlsplit(str(request.url))
    cache_read = request.headers.get("x-mock-cache-read")
    entry = {
        "method": request.method,
        "path": url.path,
        "query": url.query,
        "body": body,
        "cache_read": int(cache_read) if cache_read is not None else 0,
        "anthropic_version": request.headers.get("anthropic-version"),
        # How the SDK presented ANTHROPIC_API_KEY: "x-api-key", "bearer" (Authorization) or None.
        "auth": auth_scheme(request.headers),
    }
    by_request[id(request)] = entry
    exchanges.append(entry)


def on_response(response):
    entry = by_request.get(id(response.request))
    if entry is None:
        fail(f"a response without a logged request: {response.request.url}")
    entry["status"] = response.status_code
    entry["request_id"] = response.headers.get("request-id")
    entry["upstream_request_id"] = response.headers.get("x-upstream-request-id")
    entry["content_type"] = response.headers.get("content-type")
    entry["content_encoding"] = response.headers.get("content-encoding")


def last_exchange(name, path):
    """The exchange a call just made: exactly one new one, to `path`, answered 200."""
    if not exchanges:
        fail(f"{name}: no HTTP exchange was logged")
    i = len(exchanges) - 1
    e = exchanges[i]
    if e["path"] != path or e.get("status") != 200:
        fail(f"{name}: unexpected exchange {e}")
    if e["auth"] is None:
        fail(f"{name}: the SDK sent ANTHROPIC_API_KEY neither as x-api-key nor as a Bearer token")
    if path.startswith("/v1/messages"):
        if not e.get("upstream_request_id"):
            fail(f"{name}: no x-upstream-request-id on relay's answer: {e}")
        if not (e.get("request_id") or "").startswith("req_"):
            fail(f"{name}: no request-id on relay's answer: {e}")
    return i, e


def call_record(name, path, **extra):
    i, e = last_exchange(name, path)
    return {"exchange": i, "body": e["body"], "upstream_request_id": e.get("upstream_request_id"), **extra}


def usage_of(message):
    u = message.usage
    return {
        "input_tokens": u.input_tokens,
        "output_tokens": u.output_tokens,
        "cache_creation_input_tokens": u.cache_creation_input_tokens or 0,
        "cache_read_input_tokens": u.cache_read_input_tokens or 0,
        "cache_5m": (u.cache_creation.ephemeral_5m_input_tokens if u.cache_creation else 0) or 0,
        "cache_1h": (u.cache_creation.ephemeral_1h_input_tokens if u.cache_creation else 0) or 0,
    }


def check(cond, message):
    if not cond:
        fail(message)


WEATHER_TOOL = {
    "name": "get_weather",
    "description": "The current weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "City name"},
            "days": {"type": "integer"},
        },
        "required": ["city"],
    },
}


def main():
    for var in ("ANTHROPIC_BASE_URL", "ANTHROPIC_API_KEY"):
        if not os.environ.get(var):
            fail(f"{var} is not set")
    http_client = anthropic.DefaultHttpxClient(event_hooks={"request": [on_request], "response": [on_response]})
    # No retries: one SDK call is one HTTP attempt, so the usage rows can be counted exactly.
    client = anthropic.Anthropic(max_retries=0, timeout=60.0, http_client=http_client)
    calls = {}

    # Non-streaming, every usage field exercised: 5m and 1h cache writes and a cache read.
    message = client.messages.create(
        model=MODEL,
        max_tokens=512,
        system=[{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}],
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "A long document…", "cache_control": {"type": "ephemeral", "ttl": "1h"}},
                    {"type": "text", "text": "Summarise it."},
                ],
            }
        ],
        extra_headers={"x-mock-cache-read": str(CACHE_READ)},
    )
    check(message.type == "message" and message.role == "assistant", f"create: not a message: {message}")
    check(message.content and message.content[0].type == "text" and message.content[0].text, f"create: {message}")
    check(message.stop_reason == "end_turn", f"create: stop_reason {message.stop_reason}")
    calls["create"] = call_record(
        "create", "/v1/messages", usage=usage_of(message), request_id=message._request_id, model=message.model
    )

    # Streaming, raw: the bytes exactly as they arrive.
    with client.messages.with_streaming_response.create(
        model=MODEL,
        max_tokens=256,
        stream=True,
        system=[{"type": "text", "text": "Stream it.", "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
        messages=[{"role": "user", "content": "Say hello to relay, slowly."}],
        extra_headers={"x-mock-cache-read": str(CACHE_READ)},
    ) as response:
        check(response.status_code == 200, f"raw_stream: status {response.status_code}")
        raw = b"".join(response.iter_bytes())
    check(raw.startswith(b"event: message_start"), f"raw_stream: {raw[:200]!r}")
    calls["raw_stream"] = call_record(
        "raw_stream",
        "/v1/messages",
        sse_base64=base64.b64encode(raw).decode("ascii"),
        content_type=exchanges[-1].get("content_type"),
        content_encoding=exchanges[-1].get("content_encoding"),
    )

    # Streaming through the SDK's helper, with thinking: events accumulated into the final message.
    with client.messages.stream(
        model=MODEL,
        max_tokens=2048,
        thinking={"type": "adaptive"},
        messages=[{"role": "user", "content": "Think, then greet relay."}],
    ) as stream:
        streamed_text = "".join(stream.text_stream)
        final = stream.get_final_message()
        helper_request_id = stream.request_id
    text = final.content[-1].text if final.content and final.content[-1].type == "text" else ""
    check(text, f"stream_helper: no final text: {final}")
    check(streamed_text == text, "stream_helper: text_stream differs from the final text")
    check(final.content[0].type == "thinking" and final.content[0].signature, f"stream_helper: {final.content[0]}")
    check(final.stop_reason == "end_turn", f"stream_helper: stop_reason {final.stop_reason}")
    calls["stream_helper"] = call_record(
        "stream_helper",
        "/v1/messages",
        usage=usage_of(final),
        text=text,
        thinking=final.content[0].thinking,
        request_id=helper_request_id,
    )

    # Tool use, non-streaming.
    message = client.messages.create(
        model=MODEL,
        max_tokens=256,
        tools=[WEATHER_TOOL],
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
    )
    blocks = [b for b in message.content if b.type == "tool_use"]
    check(blocks and message.stop_reason == "tool_use", f"tool_use: no tool_use block: {message}")
    check(isinstance(blocks[0].input, dict), f"tool_use: input not parsed: {blocks[0]}")
    calls["tool_use"] = call_record(
        "tool_use",
        "/v1/messages",
        usage=usage_of(message),
        tool_name=blocks[0].name,
        tool_id=blocks[0].id,
        tool_input=blocks[0].input,
    )

    # Tool use, streaming: the SDK assembles the input from input_json_delta pieces.
    with client.messages.stream(
        model=MODEL,
        max_tokens=256,
        tools=[WEATHER_TOOL],
        tool_choice={"type": "tool", "name": "get_weather"},
        messages=[{"role": "user", "content": "Weather in Oslo for 3 days?"}],
    ) as stream:
        final = stream.get_final_message()
    blocks = [b for b in final.content if b.type == "tool_use"]
    check(blocks and final.stop_reason == "tool_use", f"tool_stream: no tool_use block: {final}")
    check(isinstance(blocks[0].input, dict), f"tool_stream: input not parsed: {blocks[0]}")
    calls["tool_stream"] = call_record(
        "tool_stream", "/v1/messages", usage=usage_of(final), tool_name=blocks[0].name, tool_input=blocks[0].input
    )

    # count_tokens.
    counted = client.messages.count_tokens(
        model=MODEL,
        messages=[{"role": "user", "content": "Count these tokens, please."}],
    )
    calls["count_tokens"] = call_record(
        "count_tokens", "/v1/messages/count_tokens", input_tokens=counted.input_tokens
    )

    # Models: one page, every page two at a time (the SDK follows has_more/last_id), one by id.
    before = len(exchanges)
    page = client.models.list()
    ids = [m.id for m in page.data]
    check(ids, "models: the list is empty")
    check(all(m.type == "model" and m.display_name for m in page.data), f"models: {page.data}")
    paged = [m.id for m in client.models.list(limit=2)]
    retrieved = client.models.retrieve(ids[0])
    check(retrieved.id == ids[0], f"models.retrieve: {retrieved}")
    check(all(e.get("status") == 200 for e in exchanges[before:]), f"models: {exchanges[before:]}")
    calls["models"] = {
        "ids": ids,
        "paged_ids": paged,
        "pages_fetched": len(exchanges) - before - 2,
        "retrieved": retrieved.id,
    }

    print(json.dumps({"sdk_version": anthropic.__version__, "exchanges": exchanges, "calls": calls}))


if __name__ == "__main__":
    try:
        main()
    except SystemExit:
        raise
    except Exception:
        traceback.print_exc()
        fail("an SDK call failed (traceback above)")
