#!/usr/bin/env python3
"""Checks that the official `openai` and `anthropic` Python SDKs parse everything the Portcullis
simulator sends, and that their own retry logic treats its errors as the real API's: text and
streams, tool round trips, streamed tool calls assembled by the SDKs' stream helpers, structured
output through their parse helpers (a forced tool for Anthropic), thinking signatures, images.

Usage: sdk_check.py http://127.0.0.1:PORT   (a running simulator; see .ci/sdk-check)
Exits non-zero on the first failure.
"""

import json
import sys
import urllib.request

import anthropic
import openai
import pydantic

BASE = sys.argv[1].rstrip("/")
# Placeholder keys: the simulator accepts any non-empty key. Never a real one.
OPENAI_KEY = "sk-sim-not-a-real-key"
ANTHROPIC_KEY = "sk-ant-sim-not-a-real-key"
OPENAI_MODEL = "gpt-4o-mini"
CLAUDE_MODEL = "claude-haiku-4-5"
# A 1x1 PNG.
PNG_B64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)


class Weather(pydantic.BaseModel):
    city: str
    unit: str
    days: int


class Person(pydantic.BaseModel):
    name: str
    age: int
    tags: list[str]
    pet: Weather | None


WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1},
    },
    "required": ["city", "unit", "days"],
}
OPENAI_TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_SCHEMA}}]
CLAUDE_TOOLS = [{"name": "get_weather", "description": "The weather", "input_schema": WEATHER_SCHEMA}]


def control(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        BASE + path, data=data, method=method, headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def set_faults(faults):
    control("POST", "/_sim/faults", {"faults": faults})
    control("POST", "/_sim/reset")


def stats():
    return control("GET", "/_sim/stats")


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def oa(max_retries=2):
    return openai.OpenAI(base_url=BASE + "/v1", api_key=OPENAI_KEY, max_retries=max_retries)


def an(max_retries=2):
    return anthropic.Anthropic(base_url=BASE, api_key=ANTHROPIC_KEY, max_retries=max_retries)


def openai_completion():
    r = oa().chat.completions.create(
        model=OPENAI_MODEL,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
        max_tokens=100,
    )
    check(r.id.startswith("chatcmpl-"), f"id {r.id}")
    check(r.choices[0].message.content, "content")
    check(r.choices[0].finish_reason == "stop", f"finish {r.choices[0].finish_reason}")
    check(r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0, f"usage {r.usage}")
    check(r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, "total")
    raw = oa().chat.completions.with_raw_response.create(
        model=OPENAI_MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    check(raw.headers["x-request-id"].startswith("req_"), "x-request-id")
    check(raw.parse().choices[0].finish_reason == "length", "max_tokens gives length")


def openai_stream():
    text, usage, finish = "", None, None
    stream = oa().chat.completions.create(
        model=OPENAI_MODEL,
        messages=[{"role": "user", "content": "Tell me a story"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    n = 0
    for chunk in stream:
        n += 1
        if chunk.usage is not None:
            usage = chunk.usage
            check(chunk.choices == [], "usage chunk has no choices")
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    check(n > 5 and text, f"{n} chunks, text {text!r}")
    check(finish == "stop", f"finish {finish}")
    check(usage is not None and usage.completion_tokens > 0, f"usage {usage}")


def anthropic_completion():
    m = an().messages.create(
        model=CLAUDE_MODEL,
        max_tokens=100,
        system="Be brief.",
        messages=[{"role": "user", "content": "Hello"}],
    )
    check(m.id.startswith("msg_01"), f"id {m.id}")
    check(m.content[0].type == "text" and m.content[0].text, "content")
    check(m.stop_reason == "end_turn", f"stop {m.stop_reason}")
    check(m.usage.input_tokens > 0 and m.usage.output_tokens > 0, f"usage {m.usage}")
    count = an().messages.count_tokens(
        model=CLAUDE_MODEL, system="Be brief.", messages=[{"role": "user", "content": "Hello"}]
    )
    check(count.input_tokens == m.usage.input_tokens, f"count_tokens {count} vs {m.usage}")
    s = an().messages.create(
        model=CLAUDE_MODEL,
        max_tokens=100,
        stop_sequences=["."],
        messages=[{"role": "user", "content": "Hello"}],
    )
    check(s.stop_reason == "stop_sequence" and s.stop_sequence == ".", f"stop {s.stop_reason}")


def anthropic_stream():
    with an().messages.stream(
        model=CLAUDE_MODEL, max_tokens=200, messages=[{"role": "user", "content": "Tell me a story"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    check(text and final.content[0].text == text, "streamed text")
    check(final.stop_reason == "end_turn", f"stop {final.stop_reason}")
    check(final.usage.output_tokens > 1 and final.usage.input_tokens > 0, f"usage {final.usage}")


def retry_after_429():
    # The first request of each API gets a 429 with retry-after: 1; the SDK's retry gets past it.
    set_faults([{"kind": "rate_limit", "times": 1, "retry_after_secs": 1, "family": "openai"},
                {"kind": "rate_limit", "times": 1, "retry_after_secs": 1, "family": "anthropic"}])
    r = oa(max_retries=2).chat.completions.create(
        model=OPENAI_MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=20
    )
    check(r.choices[0].message.content, "openai content after retry")
    m = an(max_retries=2).messages.create(
        model=CLAUDE_MODEL, max_tokens=20, messages=[{"role": "user", "content": "Hi"}]
    )
    check(m.content[0].text, "anthropic content after retry")
    s = stats()
    check(s["by_outcome"].get("fault_rate_limit") == 2, f"two 429s: {s}")
    check(s["by_endpoint"].get("chat_completions") == 2, f"openai retried once: {s}")
    check(s["by_endpoint"].get("messages") == 2, f"anthropic retried once: {s}")
    # Without retries, the SDKs raise their RateLimitError.
    set_faults([{"kind": "rate_limit", "times": 2}])
    try:
        oa(max_retries=0).chat.completions.create(
            model=OPENAI_MODEL, messages=[{"role": "user", "content": "Hi"}]
        )
        check(False, "openai.RateLimitError expected")
    except openai.RateLimitError as e:
        check(e.code == "rate_limit_exceeded", f"code {e.code}")
        check(e.response.headers["retry-after"] == "1", "retry-after")
    try:
        an(max_retries=0).messages.create(
            model=CLAUDE_MODEL, max_tokens=20, messages=[{"role": "user", "content": "Hi"}]
        )
        check(False, "anthropic.RateLimitError expected")
    except anthropic.RateLimitError as e:
        check(e.body["error"]["type"] == "rate_limit_error", f"body {e.body}")


def overloaded_529():
    set_faults([{"kind": "overloaded", "family": "anthropic"}])
    try:
        an(max_retries=0).messages.create(
            model=CLAUDE_MODEL, max_tokens=20, messages=[{"role": "user", "content": "Hi"}]
        )
        check(False, "anthropic.OverloadedError expected")
    except anthropic.OverloadedError as e:
        check(e.status_code == 529, f"status {e.status_code}")
        check(e.request_id and e.request_id.startswith("req_"), f"request id {e.request_id}")
    # A mid-stream overloaded_error event after a 200 raises too.
    set_faults([{"kind": "error_after_content", "family": "anthropic"}])
    try:
        with an(max_retries=0).messages.stream(
            model=CLAUDE_MODEL, max_tokens=50, messages=[{"role": "user", "content": "Hi"}]
        ) as stream:
            for _ in stream.text_stream:
                pass
        check(False, "mid-stream error expected")
    except anthropic.APIStatusError as e:
        check("overloaded" in str(e).lower(), f"error {e}")
    set_faults([])


def openai_tool_round_trip():
    messages = [{"role": "user", "content": "What does get_weather say for Oslo?"}]
    r = oa().chat.completions.create(model=OPENAI_MODEL, messages=messages, tools=OPENAI_TOOLS)
    check(r.choices[0].finish_reason == "tool_calls", f"finish {r.choices[0].finish_reason}")
    call = r.choices[0].message.tool_calls[0]
    check(call.id.startswith("call_") and call.function.name == "get_weather", f"call {call}")
    args = Weather.model_validate_json(call.function.arguments)
    messages.append(r.choices[0].message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": f"Sunny in {args.city}"})
    final = oa().chat.completions.create(model=OPENAI_MODEL, messages=messages, tools=OPENAI_TOOLS)
    check(final.choices[0].finish_reason == "stop", f"final {final.choices[0].finish_reason}")
    check("Sunny" in final.choices[0].message.content, f"text {final.choices[0].message.content}")
    # An unanswered tool call is refused with the SDK's BadRequestError.
    try:
        oa().chat.completions.create(model=OPENAI_MODEL, tools=OPENAI_TOOLS,
                                     messages=messages[:2] + [{"role": "user", "content": "?"}])
        check(False, "openai.BadRequestError expected")
    except openai.BadRequestError as e:
        check("tool_call_ids did not have response messages" in e.message, f"error {e}")


def openai_stream_tool_call():
    helper = getattr(oa().chat.completions, "stream", None) or oa().beta.chat.completions.stream
    with helper(
        model=OPENAI_MODEL,
        messages=[{"role": "user", "content": "Call get_weather for Paris"}],
        tools=OPENAI_TOOLS,
        stream_options={"include_usage": True},
    ) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    choice = final.choices[0]
    check(choice.finish_reason == "tool_calls", f"finish {choice.finish_reason}")
    call = choice.message.tool_calls[0]
    check(call.function.name == "get_weather", f"call {call}")
    Weather.model_validate_json(call.function.arguments)
    check(final.usage is not None and final.usage.completion_tokens > 0, f"usage {final.usage}")


def openai_structured_output():
    parse = getattr(oa().chat.completions, "parse", None) or oa().beta.chat.completions.parse
    r = parse(
        model=OPENAI_MODEL,
        messages=[{"role": "user", "content": "Describe a person"}],
        response_format=Person,
    )
    person = r.choices[0].message.parsed
    check(isinstance(person, Person) and person.name, f"parsed {person}")


def openai_image():
    r = oa().chat.completions.create(
        model=OPENAI_MODEL,
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is in this image?"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}},
        ]}],
    )
    check(r.choices[0].message.content, "content")
    try:
        oa().chat.completions.create(
            model=OPENAI_MODEL,
            messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{PNG_B64[:8]}"}},
            ]}],
        )
        check(False, "openai.BadRequestError expected")
    except openai.BadRequestError as e:
        check(e.code == "invalid_image_format", f"code {e.code}")


def anthropic_tool_round_trip():
    messages = [{"role": "user", "content": "What does get_weather say for Oslo?"}]
    m = an().messages.create(model=CLAUDE_MODEL, max_tokens=2048, tools=CLAUDE_TOOLS,
                             messages=messages)
    check(m.stop_reason == "tool_use", f"stop {m.stop_reason}")
    use = next(b for b in m.content if b.type == "tool_use")
    check(use.id.startswith("toolu_01"), f"id {use.id}")
    args = Weather.model_validate(use.input)
    messages.append({"role": "assistant", "content": m.content})
    messages.append({"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": use.id, "content": f"Sunny in {args.city}"}]})
    final = an().messages.create(model=CLAUDE_MODEL, max_tokens=2048, tools=CLAUDE_TOOLS,
                                 messages=messages)
    check(final.stop_reason == "end_turn", f"final {final.stop_reason}")
    check("Sunny" in final.content[0].text, f"text {final.content[0].text}")
    # Thinking: the signed block goes back unchanged; a modified one is refused.
    think = {"type": "enabled", "budget_tokens": 1024}
    t = an().messages.create(model=CLAUDE_MODEL, max_tokens=2048, tools=CLAUDE_TOOLS,
                             thinking=think, messages=messages[:1])
    check(t.content[0].type == "thinking" and t.content[0].signature, f"thinking {t.content}")
    use = next(b for b in t.content if b.type == "tool_use")
    loop = messages[:1] + [
        {"role": "assistant", "content": t.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "ok"}]},
    ]
    done = an().messages.create(model=CLAUDE_MODEL, max_tokens=2048, tools=CLAUDE_TOOLS,
                                thinking=think, messages=loop)
    check(done.stop_reason == "end_turn", f"thinking loop {done.stop_reason}")
    tampered = [b.model_dump() for b in t.content]
    tampered[0]["thinking"] += " (edited)"
    loop[1] = {"role": "assistant", "content": tampered}
    try:
        an().messages.create(model=CLAUDE_MODEL, max_tokens=2048, tools=CLAUDE_TOOLS,
                             thinking=think, messages=loop)
        check(False, "anthropic.BadRequestError expected")
    except anthropic.BadRequestError as e:
        check("Invalid `signature` in `thinking` block" in str(e), f"error {e}")


def anthropic_stream_tool_call():
    with an().messages.stream(
        model=CLAUDE_MODEL,
        max_tokens=2048,
        tools=CLAUDE_TOOLS,
        thinking={"type": "enabled", "budget_tokens": 1024},
        messages=[{"role": "user", "content": "Call get_weather for Paris"}],
    ) as stream:
        for _ in stream:
            pass
        final = stream.get_final_message()
    check(final.stop_reason == "tool_use", f"stop {final.stop_reason}")
    check(final.content[0].type == "thinking" and final.content[0].signature, "thinking block")
    use = next(b for b in final.content if b.type == "tool_use")
    Weather.model_validate(use.input)


def anthropic_structured_output():
    # No response_format in the Messages API: a forced tool whose input is the schema.
    m = an().messages.create(
        model=CLAUDE_MODEL,
        max_tokens=1024,
        tools=[{"name": "record_person", "input_schema": Person.model_json_schema()}],
        tool_choice={"type": "tool", "name": "record_person"},
        messages=[{"role": "user", "content": "Describe a person"}],
    )
    use = m.content[0]
    check(use.type == "tool_use" and use.name == "record_person", f"content {m.content}")
    person = Person.model_validate(use.input)
    check(person.name, f"person {person}")


def anthropic_image():
    m = an().messages.create(
        model=CLAUDE_MODEL,
        max_tokens=100,
        messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64}},
            {"type": "text", "text": "What is in this image?"},
        ]}],
    )
    check(m.content[0].text, "content")
    try:
        an().messages.create(
            model=CLAUDE_MODEL,
            max_tokens=100,
            messages=[{"role": "user", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": PNG_B64}},
            ]}],
        )
        check(False, "anthropic.BadRequestError expected")
    except anthropic.BadRequestError as e:
        check("appears to be a image/png image" in str(e), f"error {e}")


CHECKS = [openai_completion, openai_stream, anthropic_completion, anthropic_stream,
          openai_tool_round_trip, openai_stream_tool_call, openai_structured_output, openai_image,
          anthropic_tool_round_trip, anthropic_stream_tool_call, anthropic_structured_output,
          anthropic_image, retry_after_429, overloaded_529]


def run(checks, label=""):
    """Runs every check, reports each, and exits non-zero if any failed."""
    failed = 0
    for c in checks:
        try:
            c()
            print(f"ok   {label}{c.__name__}")
        except Exception as e:  # noqa: BLE001 - report every check
            failed += 1
            print(f"FAIL {label}{c.__name__}: {type(e).__name__}: {e}")
    if failed:
        print(f"{failed} of {len(checks)} {label}checks failed")
        sys.exit(1)
    print(f"all {len(checks)} {label}checks passed")


def main():
    print(f"openai {openai.__version__}, anthropic {anthropic.__version__}, simulator at {BASE}")
    run(CHECKS)


if __name__ == "__main__":
    main()
