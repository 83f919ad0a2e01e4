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

key_prefix=sdk
source scripts/serve-with-key.sh

OPENAI_BASE_URL="http://$address/v1" OPENAI_API_KEY="$key" \
  "$venv/bin/python" scripts/openai_sdk_check.py
