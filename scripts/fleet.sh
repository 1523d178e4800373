#!/usr/bin/env bash
# A distributed relay on one machine, as real processes: Postgres, Redis and etcd (Debian's
# packages), two control-plane replicas (leader elected on etcd), three data planes and the mock
# upstream (standing in for api.anthropic.com), with TLS and mTLS between data planes and control
# planes (a private CA made here with openssl). How to try the distributed mode in a minute, and
# what the fleet tests run on.
#
#   scripts/fleet.sh up        build (debug), start everything, print how to reach it
#   scripts/fleet.sh status    what runs, where, and whether each data plane is ready
#   scripts/fleet.sh down      stop everything (the state stays: `up` again resumes it)
#   scripts/fleet.sh down --purge   stop and delete the state directory
#
# RELAY_FLEET_DIR   state: data, certificates, tokens, logs, pids (default: .fleet in the clone; a
#                   relative path is taken from the directory you run this from)
# RELAY_FLEET_PORT  the first of the ports used (default 17100; it uses the next 60)
# RELAY_FLEET_BIN   where the binaries are (default target/debug, built by `up`; set it to skip
#                   the build, e.g. target/release)
# RELAY_FLEET_DP<N>_CONTROL_PLANE  the --control-plane of dp-N instead of its replica's URL (the
#                   fleet tests put a partition in between: a forwarder they can cut)
set -euo pipefail
caller="$PWD"
cd "$(dirname "$0")/.."
# Relative paths given in the environment are the caller's, not the repository's.
absolute() { case "$1" in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$caller/${1#./}" ;; esac; }

LOG_TAG=fleet.sh
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

if [ -n "${RELAY_FLEET_DIR:-}" ]; then DIR=$(absolute "$RELAY_FLEET_DIR"); else DIR="$PWD/.fleet"; fi
DIR="$(mkdir -p "$DIR" && cd "$DIR" && pwd)"
BASE="${RELAY_FLEET_PORT:-17100}"
PG_PORT=$((BASE + 0))
REDIS_PORT=$((BASE + 1))
ETCD_PORT=$((BASE + 2))
ETCD_PEER_PORT=$((BASE + 3))
MOCK_PORT=$((BASE + 4))
cp_port() { echo $((BASE + 10 + 10 * ($1 - 1))); }        # gRPC; metrics on +1
dp_port() { echo $((BASE + 40 + $1)); }
DP_CP=(0 1 2 1)                 # dp-N's preferred control-plane replica (it is given both, this one first)
BIN="${RELAY_FLEET_BIN:-}"
[ -z "$BIN" ] || BIN=$(absolute "$BIN")

as_postgres() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

pid_of() { cat "$DIR/pids/$1.pid" 2>/dev/null || true; }
# A process's start time (clock ticks after boot, /proc/PID/stat field 22): with its pid, what
# tells our process from a later one that got the same pid (after kill -9, a crash, a reboot).
start_time() { sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f20; }
# remember NAME PID: records the process as NAME's.
remember() { echo "$2" >"$DIR/pids/$1.pid"; start_time "$2" >"$DIR/pids/$1.start"; }
running() {
  local p; p=$(pid_of "$1")
  [ -n "$p" ] && kill -0 "$p" 2>/dev/null || return 1
  # Pid files from before start times were recorded: the pid alone.
  [ -f "$DIR/pids/$1.start" ] || return 0
  [ "$(start_time "$p")" = "$(cat "$DIR/pids/$1.start")" ]
}
forget() { rm -f "$DIR/pids/$1.pid" "$DIR/pids/$1.start"; }

tcp_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# port_free NAME PORT...: fails, saying so, when another process (not our NAME) listens there.
port_free() {
  local name=$1 port; shift
  for port in "$@"; do
    if tcp_open "$port"; then
      log "$name: port $port is in use by another process (another fleet?): stop it, or give this fleet other ports with RELAY_FLEET_PORT"
      return 1
    fi
  done
}

# start NAME PORTS CMD...: runs CMD in the background (its own session), logs to logs/NAME.log;
# PORTS (space-separated) must be free first.
start() {
  local name=$1 ports=$2; shift 2
  if running "$name"; then return; fi
  forget "$name"
  # shellcheck disable=SC2086
  port_free "$name" $ports
  setsid "$@" >>"$DIR/logs/$name.log" 2>&1 </dev/null &
  remember "$name" $!
}

# wait_until NAME WHAT CMD...: up to 60 s, and only while NAME's process runs ("-": no process).
wait_until() {
  local name=$1 what=$2; shift 2
  for _ in $(seq 1 300); do
    "$@" >/dev/null 2>&1 && return 0
    if [ "$name" != - ] && ! running "$name"; then
      log "$what exited; the end of $DIR/logs/$name.log:"
      tail -n 20 "$DIR/logs/$name.log" >&2 || true
      return 1
    fi
    sleep 0.2
  done
  log "$what did not come up; see $DIR/logs/"
  return 1
}
http_ok() { curl -fsS -o /dev/null "http://127.0.0.1:$1$2"; }

ensure_packages() {
  [ -n "$(pg_bin)" ] || apt_install postgresql
  command -v redis-server >/dev/null || apt_install redis-server
  command -v etcd >/dev/null || apt_install etcd-server
  command -v openssl >/dev/null || apt_install openssl
  command -v curl >/dev/null || apt_install curl
  command -v python3 >/dev/null || apt_install python3
}

certs() {
  local c="$DIR/certs"
  [ -f "$c/dp-3.pem" ] && return
  mkdir -p "$c"
  log "making a private CA, the control planes' certificate and one per data plane (mTLS)"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
    -subj /CN=relay-fleet-ca -keyout "$c/ca.key" -out "$c/ca.pem" 2>/dev/null
  issue() { # issue NAME SAN EKU
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$1" \
      -keyout "$c/$1.key" -out "$c/$1.csr" 2>/dev/null
    openssl x509 -req -in "$c/$1.csr" -CA "$c/ca.pem" -CAkey "$c/ca.key" -CAcreateserial -days 365 \
      -extfile <(printf 'subjectAltName=%s\nextendedKeyUsage=%s\n' "$2" "$3") -out "$c/$1.pem" 2>/dev/null
  }
  issue cp "DNS:localhost,IP:127.0.0.1" serverAuth
  for n in 1 2 3; do issue "dp-$n" "DNS:dp-$n" clientAuth; done
  chmod 600 "$c"/*.key
}

secrets() {
  umask 077
  [ -f "$DIR/master.key" ] || openssl rand -base64 32 >"$DIR/master.key"
  [ -f "$DIR/admin.token" ] || printf 'rat-%s\n' "$(openssl rand -hex 32)" >"$DIR/admin.token"
  umask 022
}

# Where Postgres keeps its cluster: $DIR/pg, or, when run by root in a directory the postgres user
# cannot reach (a clone under /root, mode 0700), a directory under /var/tmp that $DIR/pg links to.
pg_dir() {
  if [ -L "$DIR/pg" ]; then readlink "$DIR/pg"; return; fi
  if [ "$(id -u)" = 0 ] && [ ! -d "$DIR/pg" ] && ! runuser -u postgres -- test -x "$DIR" 2>/dev/null; then
    local elsewhere; elsewhere="/var/tmp/relay-fleet-$(printf '%s' "$DIR" | cksum | cut -d' ' -f1)/pg"
    mkdir -p "$elsewhere"
    ln -s "$elsewhere" "$DIR/pg"
    log "the postgres user cannot reach $DIR: Postgres keeps its data in $elsewhere ($DIR/pg links to it)"
    echo "$elsewhere"
    return
  fi
  echo "$DIR/pg"
}

start_postgres() {
  local bin pg; bin=$(pg_bin); pg=$(pg_dir)
  if [ ! -f "$pg/data/PG_VERSION" ]; then
    log "initdb ($pg)"
    mkdir -p "$pg"
    [ "$(id -u)" = 0 ] && chown -R postgres "$pg"
    as_postgres "$bin/initdb" -D "$pg/data" -U postgres --auth=trust -E UTF8 >"$DIR/logs/initdb.log" 2>&1 || {
      log "initdb failed; the end of $DIR/logs/initdb.log:"
      tail -n 20 "$DIR/logs/initdb.log" >&2
      return 1
    }
  fi
  local launcher=-
  if ! running postgres; then
    forget postgres
    port_free postgres "$PG_PORT"
    # Its own session; as the postgres user when run by root (Postgres refuses root).
    local as=()
    [ "$(id -u)" = 0 ] && as=(runuser -u postgres --)
    setsid "${as[@]}" "$bin/postgres" -D "$pg/data" -p "$PG_PORT" -k "$pg" \
      -c listen_addresses=127.0.0.1 >>"$DIR/logs/postgres.log" 2>&1 </dev/null &
    # runuser (when root) waits for the postmaster: it lives exactly as long.
    remember postgres-launch $!
    launcher=postgres-launch
  fi
  # Ours, not another server on the port: its pid file is there and it accepts connections.
  wait_until "$launcher" Postgres bash -c '[ -s "$1/data/postmaster.pid" ] && "$2/pg_isready" -q -h 127.0.0.1 -p "$3"' _ "$pg" "$bin" "$PG_PORT"
  forget postgres-launch
  # The postmaster's own pid (not runuser's): what `down` and the failure tests signal.
  running postgres || remember postgres "$(head -n 1 "$pg/data/postmaster.pid")"
  "$bin/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname='relay'" | grep -q 1 ||
    "$bin/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -qc "CREATE DATABASE relay"
}

database_url() { echo "postgres://postgres@127.0.0.1:$PG_PORT/relay"; }

relayctl_() {
  RELAY_SERVER="https://localhost:$(cp_port 1)" RELAY_CA_FILE="$DIR/certs/ca.pem" \
    RELAY_ADMIN_TOKEN="$(cat "$DIR/admin.token")" "$BIN/relayctl" "$@"
}

start_control_plane() {
  local n=$1 port; port=$(cp_port "$1")
  start "cp-$n" "$port $((port + 1))" env RELAY_ADMIN_TOKEN="$(cat "$DIR/admin.token")" RUST_LOG=info \
    "$BIN/relay-control-plane" --database-url "$(database_url)" \
    --listen "127.0.0.1:$port" --metrics-listen "127.0.0.1:$((port + 1))" \
    --master-key-file "$DIR/master.key" --replica "cp-$n" \
    --redis-url "redis://127.0.0.1:$REDIS_PORT" --etcd-endpoints "http://127.0.0.1:$ETCD_PORT" \
    --tls-cert "$DIR/certs/cp.pem" --tls-key "$DIR/certs/cp.key" --client-ca "$DIR/certs/ca.pem"
  wait_until "cp-$n" "control plane cp-$n" tcp_open "$port"
}

# dp-N's --control-plane: both replicas, its preferred one first (it fails over to the other), or
# RELAY_FLEET_DP<N>_CONTROL_PLANE.
dp_control_plane() {
  local var="RELAY_FLEET_DP$1_CONTROL_PLANE" pref=${DP_CP[$1]}
  echo "${!var:-https://localhost:$(cp_port "$pref"),https://localhost:$(cp_port $((3 - pref)))}"
}

start_data_plane() {
  local n=$1
  mkdir -p "$DIR/dp-$n"
  start "dp-$n" "$(dp_port "$n")" env RUST_LOG=info "$BIN/relay-data-plane" \
    --control-plane "$(dp_control_plane "$n")" --control-plane-ca "$DIR/certs/ca.pem" \
    --tls-cert "$DIR/certs/dp-$n.pem" --tls-key "$DIR/certs/dp-$n.key" \
    --listen "127.0.0.1:$(dp_port "$n")" --node-id "dp-$n" --data-dir "$DIR/dp-$n" \
    --token-file "$DIR/dp.token" --redis-url "redis://127.0.0.1:$REDIS_PORT"
}

up() {
  ensure_packages
  if [ -z "${RELAY_FLEET_BIN:-}" ]; then
    ensure_build_tools
    log "cargo build (relay-control-plane, relay-data-plane, relayctl, relay-mock-upstream)"
    cargo build --quiet -p relay-control-plane-bin -p relay-data-plane -p relayctl -p relay-mock-upstream
    BIN="$PWD/target/debug"
  fi
  mkdir -p "$DIR/logs" "$DIR/pids" "$DIR/redis" "$DIR/etcd"
  certs
  secrets
  start_postgres
  start redis "$REDIS_PORT" redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$DIR/redis" --save "" --appendonly no
  wait_until redis Redis redis-cli -p "$REDIS_PORT" ping
  start etcd "$ETCD_PORT $ETCD_PEER_PORT" etcd --name fleet --data-dir "$DIR/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "fleet=http://127.0.0.1:$ETCD_PEER_PORT"
  wait_until etcd etcd curl -fsS "http://127.0.0.1:$ETCD_PORT/health"
  start mock "$MOCK_PORT" "$BIN/relay-mock-upstream" --listen "127.0.0.1:$MOCK_PORT"
  wait_until mock "the mock upstream" tcp_open "$MOCK_PORT"
  # One replica first (it migrates the schema), then the second.
  start_control_plane 1
  start_control_plane 2
  if [ ! -s "$DIR/dp.token" ]; then
    log "creating the data planes' token, an account on the mock upstream and a client key"
    umask 077
    relayctl_ -o json token create fleet-data-planes --role data-plane |
      python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])' >"$DIR/dp.token"
    printf 'mock-upstream-credential' |
      relayctl_ account create mock --kind anthropic-compatible --base-url "http://127.0.0.1:$MOCK_PORT" --secret-stdin >/dev/null
    relayctl_ -o json key create fleet | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])' >"$DIR/client.key"
    umask 022
  fi
  for n in 1 2 3; do start_data_plane "$n"; done
  for n in 1 2 3; do wait_until "dp-$n" "data plane dp-$n" http_ok "$(dp_port "$n")" /readyz; done
  status
  # How to run this script again: from anywhere, with the settings this fleet was started with.
  local again="$PWD/scripts/fleet.sh"
  [ -z "${RELAY_FLEET_PORT:-}" ] || again="RELAY_FLEET_PORT=$BASE $again"
  [ -z "${RELAY_FLEET_DIR:-}" ] || again="RELAY_FLEET_DIR=$DIR $again"
  cat <<EOF2

The fleet is up (state in $DIR). Try it:

  curl -sS http://127.0.0.1:$(dp_port 1)/v1/messages -H "x-api-key: \$(cat $DIR/client.key)" \\
    -H 'anthropic-version: 2023-06-01' -H 'content-type: application/json' \\
    -d '{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{"role":"user","content":"hi"}]}'

  export RELAY_SERVER=https://localhost:$(cp_port 1) RELAY_CA_FILE=$DIR/certs/ca.pem   # cp-2: https://localhost:$(cp_port 2)
  export RELAY_ADMIN_TOKEN="\$(cat $DIR/admin.token)"
  $BIN/relayctl proxies list

  $again status
  $again down      # stop (state kept); down --purge deletes it
EOF2
}

status() {
  printf '%-10s %-8s %-8s %s\n' PROCESS PID STATE ADDRESS
  row() { local st=stopped; running "$1" && st=running; printf '%-10s %-8s %-8s %s\n' "$1" "$(pid_of "$1")" "$st" "$2"; }
  row postgres "$(database_url)"
  row redis "redis://127.0.0.1:$REDIS_PORT"
  row etcd "http://127.0.0.1:$ETCD_PORT"
  row mock "http://127.0.0.1:$MOCK_PORT (the upstream)"
  for n in 1 2; do row "cp-$n" "https://localhost:$(cp_port "$n") (gRPC, mTLS), metrics http://127.0.0.1:$(($(cp_port "$n") + 1))/metrics"; done
  for n in 1 2 3; do
    local ready=not-ready
    running "dp-$n" && http_ok "$(dp_port "$n")" /readyz 2>/dev/null && ready=ready
    local from="cp-${DP_CP[$n]}, else cp-$((3 - DP_CP[n]))" var="RELAY_FLEET_DP${n}_CONTROL_PLANE"
    [ -z "${!var:-}" ] || from="${!var}"
    row "dp-$n" "http://127.0.0.1:$(dp_port "$n") ($ready; config from $from)"
  done
}

down() {
  local name p
  for name in dp-1 dp-2 dp-3 cp-2 cp-1 mock etcd redis postgres; do
    p=$(pid_of "$name")
    [ -n "$p" ] || continue
    # Only our process: a pid reused by another one since is left alone.
    if running "$name"; then
      kill -TERM "$p" 2>/dev/null || true
      # A stopped (SIGSTOP) process cannot act on TERM: continue it.
      kill -CONT "$p" 2>/dev/null || true
      for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$p" 2>/dev/null || true
    fi
    forget "$name"
  done
  log "stopped"
  if [ "${1:-}" = --purge ]; then
    # Postgres' directory elsewhere (see pg_dir) goes with the state.
    [ -L "$DIR/pg" ] && rm -rf "$(dirname "$(readlink "$DIR/pg")")"
    rm -rf "$DIR"
    log "removed $DIR"
  fi
}

[ -z "$BIN" ] || BIN="$(cd "$BIN" && pwd)"
[ -n "$BIN" ] || BIN="$PWD/target/debug"
case "${1:-}" in
  up) up ;;
  status) mkdir -p "$DIR/pids"; status ;;
  down) shift; down "$@" ;;
  *) echo "usage: scripts/fleet.sh up|status|down [--purge]" >&2; exit 2 ;;
esac
