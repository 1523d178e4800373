#!/usr/bin/env bash
# relay's benchmarks: one command, bounded in time, loopback only.
#
#   scripts/bench.sh            full run (about 6 minutes of measuring, plus the release build)
#   scripts/bench.sh --quick    about 2 minutes of measuring, smaller numbers
#   scripts/bench.sh --tiny     a smoke test of the harness (numbers meaningless)
#   extra arguments go to `relay-bench run` (e.g. --only latency,saturation,limits --keep-db)
#
# Installs what it needs when missing (nginx, Redis and PostgreSQL from Debian's
# packages), builds the release binaries, then runs `relay-bench run`, which
# starts two mock upstreams, a fresh Postgres database, a control plane, a data
# plane and nginx on 127.0.0.1, runs every scenario of docs/benchmarks.md
# against direct, nginx and relay, stops everything, and writes
# bench/results/<timestamp>.json and .md. DATABASE_URL, when set, is the
# Postgres server to create the run's database in.
set -euo pipefail
cd "$(dirname "$0")/.."

LOG_TAG=bench.sh
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

ensure_nginx() {
  [ -x /usr/sbin/nginx ] || apt_install nginx-light
  # Only our own foreground nginx (generated config, temp prefix) is used.
}

ensure_redis() {
  # Scenario 8 (the limit check) starts its own redis-server on a free loopback
  # port (no persistence); the system service is not used.
  [ -x /usr/bin/redis-server ] || apt_install redis-server
}

ensure_postgres() {
  if [ -n "${DATABASE_URL:-}" ]; then return; fi
  if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
    if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
      apt_install postgresql postgresql-client
    fi
    local ver
    ver=$(ls /etc/postgresql | sort -V | tail -n 1)
    log "starting PostgreSQL $ver"
    as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main start || true
    for _ in $(seq 1 50); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.2; done
  fi
  if command -v runuser >/dev/null && id postgres >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- psql -q -c "ALTER USER postgres PASSWORD 'postgres'" >/dev/null 2>&1 || true
  fi
  export DATABASE_URL="postgres://postgres:postgres@127.0.0.1:5432/postgres"
}

ensure_nginx
ensure_redis
ensure_postgres
command -v getconf >/dev/null || apt_install libc-bin

# Scenario 4 holds up to 10,000 streams: relay needs two sockets per stream.
hard=$(ulimit -Hn)
if [ "$hard" != unlimited ] && [ "$hard" -lt 65536 ]; then
  ulimit -Hn 65536 2>/dev/null || log "cannot raise the hard open-files limit above $hard (container limit); scenario 4 reports the largest N reached"
fi
ulimit -n "$(ulimit -Hn)"
log "open files limit: $(ulimit -n)"

log "cargo build --release --workspace --bins"
cargo build --release --workspace --bins --quiet

# Everything the run starts is its child and stops with it; the timeout is a last resort.
exec timeout --signal=INT --kill-after=60 2400 target/release/relay-bench run --bin-dir target/release --out bench/results "$@"
