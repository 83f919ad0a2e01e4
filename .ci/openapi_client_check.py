"""A client generated from openapi.yaml by openapi-python-client (SPEC B14).

Run by .ci/openapi-lint.sh, which generates the package `autopoiesis_client`,
starts a keyed server (scripts/serve-with-key.sh) and passes its URL and key
in AUTOPOIESIS_URL and AUTOPOIESIS_KEY. Proves that the spec lets a
generated client send the key (either way the spec declares), parse the
401 it gets without it, and read history messages as typed parts. Each
check prints one line; any failure raises and exits non-zero.
"""

import os
import uuid

from autopoiesis_client import AuthenticatedClient, Client
from autopoiesis_client.api.chat import send_chat_message
from autopoiesis_client.api.sessions import get_session_history, list_sessions
from autopoiesis_client.models import (
    ChatRequest,
    ChatResponse,
    Error,
    ModelMessageModelRequest,
    ModelMessageModelResponse,
    ModelRequestPartUserPromptPart,
    ModelResponsePartTextPart,
    SessionHistory,
)

BASE = os.environ["AUTOPOIESIS_URL"]  # http://127.0.0.1:PORT
KEY = os.environ["AUTOPOIESIS_KEY"]


def client(**auth):
    # A status the spec does not declare raises instead of parsing as None.
    if not auth:
        return Client(base_url=BASE, raise_on_unexpected_status=True)
    return AuthenticatedClient(base_url=BASE, raise_on_unexpected_status=True, **auth)


keyed = {
    "Bearer": client(token=KEY),
    "X-API-Key": client(token=KEY, auth_header_name="X-API-Key", prefix=""),
}
for how, authenticated in keyed.items():
    res = list_sessions.sync_detailed(client=authenticated)
    assert res.status_code == 200, res
    assert isinstance(res.parsed, list), res.parsed
    print(f"ok list_sessions with the key as {how}: 200, {len(res.parsed)} sessions")

session = f"generated-{uuid.uuid4().hex[:8]}"
res = send_chat_message.sync_detailed(
    client=keyed["Bearer"],
    body=ChatRequest(content="hello from a generated client", session_id=session),
)
assert res.status_code == 200 and isinstance(res.parsed, ChatResponse), res
res = get_session_history.sync_detailed(session, client=keyed["Bearer"])
assert res.status_code == 200 and isinstance(res.parsed, SessionHistory), res
request, response = res.parsed.messages
assert isinstance(request, ModelMessageModelRequest), request
assert isinstance(request.parts[0], ModelRequestPartUserPromptPart), request.parts
assert request.parts[0].content == "hello from a generated client"
assert isinstance(response, ModelMessageModelResponse), response
assert isinstance(response.parts[0], ModelResponsePartTextPart), response.parts
print(
    "ok send_chat_message and get_session_history: typed parts "
    f"{type(request.parts[0]).__name__}, {type(response.parts[0]).__name__}"
)

refused = {
    "no key": client(),
    "a wrong key": client(token="wrong"),
}
for how, unauthenticated in refused.items():
    res = list_sessions.sync_detailed(client=unauthenticated)
    assert res.status_code == 401, res
    assert isinstance(res.parsed, Error), res.parsed
    assert res.parsed.detail == "Invalid or missing API key", res.parsed
    challenge = res.headers["www-authenticate"]
    assert challenge.startswith('Bearer realm="autopoiesis"') and "X-API-Key" in challenge
    print(f"ok list_sessions with {how}: 401 parsed as Error(detail={res.parsed.detail!r})")
