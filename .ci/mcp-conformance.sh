#!/usr/bin/env bash
# The official MCP conformance suite (npm @modelcontextprotocol/conformance,
# pinned below) against a server this script starts on 127.0.0.1 and stops
# again (scripts/serve-with-key.sh, auth off: the suite cannot send a key).
# Runs the server scenarios that apply to what the server offers; the
# others need the suite's own fixture tools, prompts and resources (see the
# README, "MCP clients"). Prints one pass/FAIL line per scenario, the
# suite's output for each failure, and exits non-zero if any failed.
#
#   .ci/mcp-conformance.sh
#
# Needs Node 22 (.ci/node.sh fetches it from the npm registry when the
# machine's is older); the suite is installed under target/, not globally.
set -euo pipefail
cd "$(dirname "$0")/.."

version=0.1.16
scenarios=(
  server-initialize
  ping
  tools-list
  logging-set-level
  resources-list
  server-sse-multiple-streams
  dns-rebinding-protection
)

source .ci/node.sh
suite_dir=target/mcp-conformance
suite="$suite_dir/node_modules/@modelcontextprotocol/conformance"
installed=$(node -p "require('./$suite/package.json').version" 2>/dev/null || true)
if [ "$installed" != "$version" ]; then
  echo "== installing @modelcontextprotocol/conformance@$version under $suite_dir"
  npm install --prefix "$suite_dir" --no-audit --no-fund --silent \
    "@modelcontextprotocol/conformance@$version"
fi

without_key=1
key_prefix=conformance
source scripts/serve-with-key.sh

results="$suite_dir/results"
rm -rf "$results" && mkdir -p "$results"
failed=()
for scenario in "${scenarios[@]}"; do
  out="$results/$scenario.log"
  if NO_COLOR=1 node "$suite/dist/index.js" server --url "http://$address/mcp" \
      --scenario "$scenario" --output-dir "$results" >"$out" 2>&1; then
    echo "pass $scenario"
  else
    echo "FAIL $scenario"
    sed 's/^/    /' "$out"
    failed+=("$scenario")
  fi
done

if [ "${#failed[@]}" -gt 0 ]; then
  echo "MCP conformance: ${#failed[@]} of ${#scenarios[@]} scenarios failed: ${failed[*]}"
  exit 1
fi
echo "MCP conformance: all ${#scenarios[@]} scenarios passed (suite $version)"
