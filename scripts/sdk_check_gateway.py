#!/usr/bin/env python3
"""The official `openai` Python SDK against the example gateway (examples/axum_gateway.rs), as a
user who points an existing OpenAI client at it would: completions, streams with usage, the
SDK's stream helper, its typed 4xx errors, content as parts with an image, a tool round trip
with `tool_choice: "required"`, a streamed tool call, structured output through `parse`.

Usage: sdk_check_gateway.py http://127.0.0.1:PORT   (a running gateway; see .ci/sdk-check)
Exits non-zero if any check fails.
"""

import sys

import openai

# The shared checks (and their models and schemas) of scripts/sdk_check.py, pointed at the
# gateway: they only use the OpenAI client.
import sdk_check as s

GATEWAY = sys.argv[1].rstrip("/")
s.BASE = GATEWAY


def client(max_retries=0):
    return openai.OpenAI(base_url=GATEWAY + "/v1", api_key="sk-gateway-client", max_retries=max_retries)


def completion():
    r = client().chat.completions.create(
        model=s.OPENAI_MODEL,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
        max_tokens=100,
    )
    s.check(r.choices[0].message.content, "content")
    s.check(r.choices[0].finish_reason == "stop", f"finish {r.choices[0].finish_reason}")
    s.check(r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, "usage")
    raw = client().chat.completions.with_raw_response.create(
        model=s.OPENAI_MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    s.check(raw.headers["x-portcullis-provider"] == "openai", "x-portcullis-provider")
    s.check(raw.parse().choices[0].finish_reason == "length", "max_tokens gives length")


def stream_with_usage():
    text, usage, finish, n = "", None, None, 0
    for chunk in client().chat.completions.create(
        model=s.OPENAI_MODEL,
        messages=[{"role": "user", "content": "Tell me a story"}],
        stream=True,
        stream_options={"include_usage": True},
    ):
        n += 1
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    s.check(n > 5 and text, f"{n} chunks, text {text!r}")
    s.check(finish == "stop", f"finish {finish}")
    s.check(usage is not None and usage.completion_tokens > 0, f"usage {usage}")


def stream_helper():
    helper = getattr(client().chat.completions, "stream", None) or client().beta.chat.completions.stream
    with helper(model=s.OPENAI_MODEL, messages=[{"role": "user", "content": "Hi"}]) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    s.check(final.choices[0].message.content, "content")


def errors_4xx():
    try:
        client().chat.completions.create(model="gpt-not-served", messages=[{"role": "user", "content": "Hi"}])
        s.check(False, "openai.NotFoundError expected")
    except openai.NotFoundError as e:
        s.check(e.code == "model_not_found", f"code {e.code}")
    try:
        client().chat.completions.create(model=s.OPENAI_MODEL, messages=[])
        s.check(False, "openai.BadRequestError expected")
    except openai.BadRequestError:
        pass


def parts_and_image():
    r = client().chat.completions.create(
        model=s.OPENAI_MODEL,
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is in this image?"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{s.PNG_B64}"}},
        ]}],
    )
    s.check(r.choices[0].message.content, "content")


def tools_required():
    messages = [{"role": "user", "content": [{"type": "text", "text": "Weather in Oslo?"}]}]
    r = client().chat.completions.create(
        model=s.OPENAI_MODEL, messages=messages, tools=s.OPENAI_TOOLS, tool_choice="required"
    )
    s.check(r.choices[0].finish_reason == "tool_calls", f"finish {r.choices[0].finish_reason}")
    call = r.choices[0].message.tool_calls[0]
    s.check(call.function.name == "get_weather", f"call {call}")
    s.Weather.model_validate_json(call.function.arguments)


CHECKS = [
    completion,
    stream_with_usage,
    stream_helper,
    errors_4xx,
    parts_and_image,
    tools_required,
    s.openai_tool_round_trip,
    s.openai_stream_tool_call,
    s.openai_structured_output,
]


def main():
    print(f"openai {openai.__version__}, gateway at {GATEWAY}")
    s.run(CHECKS, "gateway ")


if __name__ == "__main__":
    main()
