#!/usr/bin/env bash
# Builds relay (release) and starts it standalone: the control plane on an embedded store, the
# in-process data plane on 127.0.0.1:8080 and the admin gRPC API on 127.0.0.1:50051, with
# everything it keeps in ./relay-data (or RELAY_DATA_DIR). No Postgres, Redis or etcd needed.
#
#   scripts/standalone.sh                 build, then start in the foreground (Ctrl-C stops it)
#   scripts/standalone.sh --proxy-listen 127.0.0.1:9090   extra arguments go to relay-control-plane
set -euo pipefail
cd "$(dirname "$0")/.."

LOG_TAG=standalone.sh
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

command -v cargo >/dev/null || { echo "standalone.sh: cargo not found: install a Rust toolchain (https://rustup.rs)" >&2; exit 1; }
log "cargo build --release (relay-control-plane, relay-data-plane, relayctl): the first build takes a few minutes"
cargo build --release --quiet -p relay-control-plane-bin -p relay-data-plane -p relayctl

data_dir="${RELAY_DATA_DIR:-./relay-data}"
bin="$PWD/target/release"
cat <<NEXT

relay is starting standalone (data in $data_dir). At first start it writes the master key and the
first admin token to $data_dir/admin.token (mode 0600). In another shell:

  export PATH="$bin:\$PATH"
  export RELAY_ADMIN_TOKEN="\$(cat $data_dir/admin.token)"
  printf '%s' "\$YOUR_ANTHROPIC_API_KEY" | relayctl account create main --kind anthropic-api-key --secret-stdin
  relayctl key create my-laptop          # prints the client key once
  ANTHROPIC_BASE_URL=http://127.0.0.1:8080 ANTHROPIC_API_KEY=rk-… claude

NEXT
exec "$bin/relay-control-plane" --standalone --data-dir "$data_dir" "$@"
