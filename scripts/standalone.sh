#!/usr/bin/env bash
# Builds relay (release) and starts it standalone: the control plane on an embedded store, the
# in-process data plane on 127.0.0.1:8080, the admin gRPC API on 127.0.0.1:50051 and the web console
# on 127.0.0.1:8081, with everything it keeps in ./relay-data (or RELAY_DATA_DIR; a relative path is
# taken from the directory you run this from). No Postgres, Redis or etcd needed.
#
#   scripts/standalone.sh                 build, then start in the foreground (Ctrl-C stops it)
#   scripts/standalone.sh --proxy-listen 127.0.0.1:9090   extra arguments go to relay-control-plane
#
# RELAY_BIN   where the binaries are (default target/release, built here; set it to skip the
#             build, e.g. RELAY_BIN=target/debug after `cargo build`)
set -euo pipefail
caller="$PWD"
cd "$(dirname "$0")/.."

LOG_TAG=standalone.sh
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

# Relative paths are the caller's, not the repository's.
absolute() { case "$1" in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$caller/${1#./}" ;; esac; }

if [ -n "${RELAY_BIN:-}" ]; then
  bin="$(cd "$(absolute "$RELAY_BIN")" && pwd)"
else
  command -v cargo >/dev/null || { echo "standalone.sh: cargo not found: install a Rust toolchain (https://rustup.rs)" >&2; exit 1; }
  ensure_build_tools
  log "cargo build --release (relay-control-plane, relay-data-plane, relayctl, relay-mock-upstream): the first build takes a few minutes"
  cargo build --release --quiet -p relay-control-plane-bin -p relay-data-plane -p relayctl -p relay-mock-upstream
  bin="$PWD/target/release"
fi

data_dir="$(absolute "${RELAY_DATA_DIR:-relay-data}")"

# The addresses the next steps name: relay-control-plane's defaults, or what the arguments say.
grpc=127.0.0.1:50051 proxy=127.0.0.1:8080 web=127.0.0.1:8081
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  a=${args[i]} next=${args[i + 1]:-}
  case "$a" in
    --listen) grpc=$next ;; --listen=*) grpc=${a#*=} ;;
    --proxy-listen) proxy=$next ;; --proxy-listen=*) proxy=${a#*=} ;;
    --web-listen) web=$next ;; --web-listen=*) web=${a#*=} ;;
  esac
done
server_line=""
[ "$grpc" = 127.0.0.1:50051 ] || server_line="  export RELAY_SERVER=http://$grpc
"

cat <<NEXT

relay is starting standalone. At first start it writes the master key and the first admin token
(mode 0600) to $data_dir, with the embedded store. In another shell:

  export PATH="$bin:\$PATH"
  export RELAY_ADMIN_TOKEN="\$(cat $data_dir/admin.token)"
${server_line}  printf '%s' "\$YOUR_ANTHROPIC_API_KEY" | relayctl account create main --kind anthropic-api-key --secret-stdin
  relayctl key create my-laptop          # prints the client key once
  ANTHROPIC_BASE_URL=http://$proxy ANTHROPIC_API_KEY=rk-… claude

No Anthropic key at hand? The mock upstream answers like the Anthropic API (usage included); make it
the account instead of the printf line above:

  relay-mock-upstream --listen 127.0.0.1:9999 &
  printf 'mock-key' | relayctl account create mock --kind anthropic-compatible --base-url http://127.0.0.1:9999 --secret-stdin

The web console: http://$web (sign in with the admin token). More: README.md, docs/operations.md.

NEXT
exec "$bin/relay-control-plane" --standalone --data-dir "$data_dir" "$@"
