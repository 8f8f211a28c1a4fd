#!/usr/bin/env python3
"""Checks that the official `openai` and `anthropic` Python SDKs parse everything the Portcullis
simulator sends, and that their own retry logic treats its errors as the real API's.

Usage: sdk_check.py http://127.0.0.1:PORT   (a running simulator; see .ci/sdk-check)
Exits non-zero on the first failure.
"""

import json
import sys
import urllib.request

import anthropic
import openai

BASE = sys.argv[1].rstrip("/")
# Placeholder keys: the simulator accepts any non-empty key. Never a real one.
OPENAI_KEY = "sk-sim-not-a-real-key"
ANTHROPIC_KEY = "sk-ant-sim-not-a-real-key"
OPENAI_MODEL = "gpt-4o-mini"
CLAUDE_MODEL = "claude-haiku-4-5"


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


CHECKS = [openai_completion, openai_stream, anthropic_completion, anthropic_stream,
          retry_after_429, overloaded_529]


def main():
    print(f"openai {openai.__version__}, anthropic {anthropic.__version__}, simulator at {BASE}")
    failed = 0
    for c in CHECKS:
        try:
            c()
            print(f"ok   {c.__name__}")
        except Exception as e:  # noqa: BLE001 - report every check
            failed += 1
            print(f"FAIL {c.__name__}: {type(e).__name__}: {e}")
    if failed:
        print(f"{failed} of {len(CHECKS)} checks failed")
        sys.exit(1)
    print(f"all {len(CHECKS)} checks passed")


if __name__ == "__main__":
    main()
