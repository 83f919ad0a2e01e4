#!/usr/bin/env bash
# The official `openai` Python SDK against the /v1 facade: starts a server
# on 127.0.0.1 with an API key (the echo agent, a throwaway data dir), runs
# scripts/openai_sdk_check.py with OPENAI_BASE_URL and OPENAI_API_KEY
# pointing at it, and stops it. Needs python3; installs the SDK in a venv
# under target/.
#
#   scripts/openai-sdk.sh            # uses target/debug/autopoiesis (builds it)
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${OPENAI_SDK_VENV:-target/openai-sdk-venv}"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import openai' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "openai==3.57.0"
fi

cargo build --quiet --locked --bin autopoiesis
data=$(mktemp -d)
log="$data/server.log"
key="sdk-$RANDOM$RANDOM"
AUTOPOIESIS_API_KEY="$key" RUST_LOG=info NO_COLOR=1 \
  target/debug/autopoiesis serve --port 0 --data-dir "$data" 2>"$log" &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; rm -rf "$data"' EXIT

address=""
for _ in $(seq 1 100); do
  address=$(sed -n 's/.*listening on http:\/\/\([0-9.:]*\).*/\1/p' "$log" | head -n 1)
  [ -n "$address" ] && break
  sleep 0.1
done
[ -n "$address" ] || { echo "server did not start:"; cat "$log"; exit 1; }

OPENAI_BASE_URL="http://$address/v1" OPENAI_API_KEY="$key" \
  "$venv/bin/python" scripts/openai_sdk_check.py
