"""The official `openai` Python SDK against the server's /v1 facade (SPEC B14).

Run by scripts/openai-sdk.sh, which starts the server and passes its base URL
and key in OPENAI_BASE_URL and OPENAI_API_KEY. Each check prints one line;
any failure raises and exits non-zero.
"""

import json
import os
import urllib.request
import uuid

import openai

BASE = os.environ["OPENAI_BASE_URL"]  # http://127.0.0.1:PORT/v1
KEY = os.environ["OPENAI_API_KEY"]
client = openai.OpenAI()  # reads both variables, as any user's code would


def history(session):
    server = BASE.removesuffix("/v1")
    request = urllib.request.Request(
        f"{server}/api/sessions/{session}/history", headers={"X-API-Key": KEY}
    )
    with urllib.request.urlopen(request) as response:
        return json.load(response)["messages"]


def prompts(session):
    return [
        part["content"]
        for message in history(session)
        if message["kind"] == "request"
        for part in message["parts"]
        if part["part_kind"] == "user-prompt"
    ]


models = [model.id for model in client.models.list()]
assert "default" in models, models
print(f"ok models.list: {models}")

session = f"sdk-{uuid.uuid4().hex[:8]}"
first = client.chat.completions.create(
    model="default",
    messages=[{"role": "user", "content": "hello from the sdk"}],
    extra_headers={"X-Session-Id": session},
)
assert first.choices[0].message.content == "hello from the sdk", first
assert first.choices[0].finish_reason == "stop"
assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens
print(f"ok non-streaming completion: {first.choices[0].message.content!r}")

stream = client.chat.completions.create(
    model="default",
    messages=[
        {"role": "user", "content": "hello from the sdk"},
        {"role": "assistant", "content": "hello from the sdk"},
        {"role": "user", "content": "and a streamed second turn"},
    ],
    stream=True,
    stream_options={"include_usage": True},
    extra_headers={"X-Session-Id": session},
)
pieces, usage = [], None
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        pieces.append(chunk.choices[0].delta.content)
    if chunk.usage:
        usage = chunk.usage
assert "".join(pieces) == "and a streamed second turn", pieces
assert len(pieces) > 1, "streamed in pieces"
assert usage is not None and usage.completion_tokens > 0
print(f"ok streaming completion in {len(pieces)} chunks")

assert prompts(session) == ["hello from the sdk", "and a streamed second turn"], prompts(session)
print("ok the second turn continued the session (X-Session-Id): its history holds both")

deferred = f"sdk-{uuid.uuid4().hex[:8]}"
try:
    client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": '/tool execute {"command": "ls"}'}],
        extra_headers={"X-Session-Id": deferred},
    )
    raise AssertionError("a deferred tool call must not succeed")
except openai.APIStatusError as error:
    assert error.status_code == 409, error
    assert error.code == "approval_unsupported", (error.code, error.body)
assert prompts(deferred) == ['/tool execute {"command": "ls"}'], "sent once, not retried"
print("ok a deferred tool call is a 409 APIStatusError with code approval_unsupported, sent once")

try:
    openai.OpenAI(api_key="not-the-key").models.list()
    raise AssertionError("a wrong key must be refused")
except openai.AuthenticationError as error:
    assert error.status_code == 401, error
print("ok a wrong key is a 401 AuthenticationError")
