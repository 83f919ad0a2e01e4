# Sourced by the scripts that test a running server (schemathesis.sh,
# openai-sdk.sh, .ci/mcp-conformance.sh): builds target/debug/autopoiesis,
# starts it on 127.0.0.1 port 0 with a random API key (the echo agent, a
# throwaway data dir) and stops it when the calling script exits. Sets `key`
# and `address` (HOST:PORT). `key_prefix` names the key, for the server's
# log. `without_key=1` starts it with auth off instead (`key` is then
# empty), for clients that cannot send a key (the MCP conformance suite).

cargo build --quiet --locked --bin autopoiesis
data=$(mktemp -d)
log="$data/server.log"
# Made here, not by the server's redirection: the background job opens it
# only once it runs, and the loop below may read it before that.
: >"$log"
key="${key_prefix:-test}-$RANDOM$RANDOM"
if [ "${without_key:-}" = 1 ]; then key=""; fi
env -u AUTOPOIESIS_API_KEY ${key:+"AUTOPOIESIS_API_KEY=$key"} RUST_LOG=info NO_COLOR=1 \
  target/debug/autopoiesis serve --port 0 --data-dir "$data" 2>"$log" &
server=$!
# `|| true`: the caller runs under `set -e`, and `wait` gives the server's
# 143 (SIGTERM) status, which would otherwise become the script's own.
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true; rm -rf "$data"' EXIT

address=""
for _ in $(seq 1 100); do
  address=$(sed -n 's/.*listening on http:\/\/\([0-9.:]*\).*/\1/p' "$log" | head -n 1)
  [ -n "$address" ] && break
  sleep 0.1
done
[ -n "$address" ] || { echo "server did not start:"; cat "$log"; exit 1; }
