#!/usr/bin/env bash
# Fuzzes the served OpenAPI spec with schemathesis: every check, against a
# server this script starts on 127.0.0.1 with an API key (so auth is in the
# loop) and stops again. Needs python3; installs schemathesis in a venv.
#
#   scripts/schemathesis.sh            # uses target/debug/autopoiesis (builds it)
#
# The SSE routes are excluded: they stream until the client leaves, which a
# request/response fuzzer cannot consume (tests/it/sse.rs and
# tests/it/dashboard.rs cover them). scripts/schemathesis.toml says which
# checks two dynamically typed operations skip, and why.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${SCHEMATHESIS_VENV:-target/schemathesis-venv}"
if [ ! -x "$venv/bin/schemathesis" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "schemathesis==4.32.5"
fi

key_prefix=schemathesis
source scripts/serve-with-key.sh

"$venv/bin/schemathesis" --config-file scripts/schemathesis.toml run "http://$address/openapi.json" \
  --header "X-API-Key: $key" \
  --exclude-path-regex '(/events|/api/stream)$' \
  --max-examples "${SCHEMATHESIS_EXAMPLES:-100}" \
  --seed 1 \
  --request-timeout 10 \
  --no-color
