#!/usr/bin/env bash
# Packages every publishable crate of the workspace as crates.io would receive it, then builds
# each package from its own files alone (`cargo package` verifies, packaging the unpublished
# crates of the workspace together), so a crate that reads a file outside its directory, or a
# dependency without a version, fails here. Crates with `publish = false` (the examples, the
# test harness) are left out. Extra arguments go to `cargo package` (e.g. --no-verify).
set -euo pipefail
cd "$(dirname "$0")/.."

excluded=$(cargo metadata --no-deps --format-version 1 | python3 -c '
import json, sys
for p in json.load(sys.stdin)["packages"]:
    if p["publish"] == []:
        print("--exclude", p["name"])
')
# shellcheck disable=SC2086 # one word per flag and name
cargo package --workspace $excluded "$@"
