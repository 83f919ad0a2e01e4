#!/usr/bin/env bash
# CI: the checked-in spec (openapi.yaml) as third-party tools read it.
#
# 1. `redocly lint` with its recommended rules (redocly.yaml) finds nothing.
# 2. A Python client generated from it by openapi-python-client sends the
#    key: .ci/openapi_client_check.py calls a keyed server (started by
#    scripts/serve-with-key.sh, as schemathesis and the OpenAI SDK check
#    do) with the generated client: 200 with the key, a parsed 401 without.
#
# Both tools are pinned and installed under target/: @redocly/cli with npm
# from Node 22 (.ci/node.sh), openapi-python-client in a venv. Neither
# reaches anything but the package registries and 127.0.0.1 (redocly's
# telemetry and update check are off).
#
#   .ci/openapi-lint.sh              # uses target/debug/autopoiesis (builds it)
set -euo pipefail
cd "$(dirname "$0")/.."

redocly_version=2.77.0
generator_version=0.29.1

source .ci/node.sh
export REDOCLY_TELEMETRY=off REDOCLY_SUPPRESS_UPDATE_NOTICE=true

redocly_dir=target/openapi-lint
redocly="$redocly_dir/node_modules/.bin/redocly"
if [ "$("$redocly" --version 2>/dev/null)" != "$redocly_version" ]; then
    echo "== installing @redocly/cli@$redocly_version"
    mkdir -p "$redocly_dir"
    npm install --prefix "$redocly_dir" --no-audit --no-fund --silent "@redocly/cli@$redocly_version"
fi
echo "== redocly lint openapi.yaml (redocly $redocly_version, recommended rules)"
"$redocly" lint --config redocly.yaml openapi.yaml
# redocly fails on errors only; a warning fails here too (clean, or the
# rule is turned off in redocly.yaml with the reason).
"$redocly" lint --config redocly.yaml --format=json openapi.yaml 2>/dev/null | python3 -c '
import json, sys
totals = json.load(sys.stdin)["totals"]
print(f"   {totals}")
sys.exit(totals["errors"] + totals["warnings"] > 0)'

venv=target/openapi-client-venv
if [ "$("$venv/bin/openapi-python-client" --version 2>/dev/null)" != "openapi-python-client version: $generator_version" ]; then
    echo "== installing openapi-python-client==$generator_version"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet "openapi-python-client==$generator_version"
fi
echo "== openapi-python-client generate (openapi.yaml)"
client_dir=target/openapi-client
rm -rf "$client_dir"
mkdir -p "$client_dir"
# --fail-on-warning: a spec construct the generator cannot type (and so
# would skip or type as "any") fails the check.
# The generator formats its output with ruff, from the venv.
PATH="$(pwd)/$venv/bin:$PATH" "$venv/bin/openapi-python-client" generate --path openapi.yaml \
    --output-path "$client_dir/autopoiesis_client" --meta none --fail-on-warning

key_prefix=openapi-client
source scripts/serve-with-key.sh

echo "== the generated client against a keyed server"
PYTHONPATH="$client_dir" AUTOPOIESIS_URL="http://$address" AUTOPOIESIS_KEY="$key" \
    "$venv/bin/python" .ci/openapi_client_check.py
