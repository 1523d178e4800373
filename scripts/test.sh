#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine or a developer's box.
#
# Installs what the tests need when it is missing (Postgres, Redis, etcd,
# Chromium and chromedriver from Debian's packages; Python's anthropic SDK,
# selenium, helm-python-sdk and kubernetes-validate; rustfmt and clippy), makes sure the servers run, then runs
# the format check, clippy and every test of the workspace.
#
#   scripts/test.sh            everything
#   scripts/test.sh -p relayctl   extra arguments go to `cargo test`
#
# DATABASE_URL, REDIS_URL and ETCD_ENDPOINTS, when set, are used as they are.
set -euo pipefail
cd "$(dirname "$0")/.."

LOG_TAG=test.sh
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

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
  # A fresh Debian cluster asks for a password over TCP: give the postgres
  # role one the tests know (harmless where trust auth is configured). As
  # the postgres user (peer authentication on the local socket): through sudo
  # when a user runs this.
  if id postgres >/dev/null 2>&1 && ! PGPASSWORD=postgres psql -h 127.0.0.1 -U postgres -tAc 'SELECT 1' >/dev/null 2>&1; then
    log "setting the postgres role's password to the one the tests use"
    as_root runuser -u postgres -- psql -q -c "ALTER USER postgres PASSWORD 'postgres'" >/dev/null ||
      log "could not set the postgres role's password: tests that use Postgres will fail to log in"
  fi
  export DATABASE_URL="postgres://postgres:postgres@127.0.0.1:5432/postgres"
}

ensure_redis() {
  if [ -n "${REDIS_URL:-}" ]; then return; fi
  command -v redis-server >/dev/null || apt_install redis-server
  if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    log "starting Redis"
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
    for _ in $(seq 1 50); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 0.1; done
  fi
  export REDIS_URL="redis://127.0.0.1:6379"
}

ensure_etcd() {
  if [ -n "${ETCD_ENDPOINTS:-}" ]; then return; fi
  command -v etcd >/dev/null || apt_install etcd-server
  # Tests that need etcd start their own member on a free port (see test-support).
}

# e2e/tests/sdk.rs drives relay with the official Anthropic Python SDK.
ensure_python_sdk() {
  command -v python3 >/dev/null || apt_install python3
  if python3 -c 'import anthropic' >/dev/null 2>&1; then return; fi
  python3 -m pip --version >/dev/null 2>&1 || apt_install python3-pip
  log "installing the anthropic Python SDK"
  # Debian's own python3 is "externally managed" (PEP 668): pip refuses unless told otherwise.
  python3 -m pip install --quiet anthropic ||
    python3 -m pip install --quiet --break-system-packages anthropic
  python3 -c 'import anthropic'
}

# e2e/tests/browser.rs drives a real browser: headless Chromium and chromedriver from Debian's
# packages, through Python's selenium (which must use them, never download its own).
ensure_browser() {
  command -v python3 >/dev/null || apt_install python3
  if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    apt_install chromium chromium-driver
  fi
  if python3 -c 'import selenium' >/dev/null 2>&1; then return; fi
  python3 -m pip --version >/dev/null 2>&1 || apt_install python3-pip
  log "installing selenium (Python)"
  python3 -m pip install --quiet selenium ||
    python3 -m pip install --quiet --break-system-packages selenium
  python3 -c 'import selenium'
}

# e2e/tests/chart.rs renders the Helm chart with Helm's own library (no helm binary) and
# validates what it renders against Kubernetes' schemas (kubernetes-validate).
ensure_helm_sdk() {
  if python3 -c 'import helm_python, yaml, kubernetes_validate' >/dev/null 2>&1; then return; fi
  python3 -m pip --version >/dev/null 2>&1 || apt_install python3-pip
  log "installing helm-python-sdk (Helm's Go library), PyYAML and kubernetes-validate"
  python3 -m pip install --quiet helm-python-sdk pyyaml kubernetes-validate ||
    python3 -m pip install --quiet --break-system-packages helm-python-sdk pyyaml kubernetes-validate
  python3 -c 'import helm_python, yaml, kubernetes_validate'
}

# e2e/tests/alerts.rs checks the chart's alerting rules with promtool.
ensure_promtool() {
  command -v promtool >/dev/null || apt_install prometheus
}

ensure_rust() {
  ensure_build_tools
  cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
  cargo clippy --version >/dev/null 2>&1 || rustup component add clippy
}

ensure_rust
ensure_postgres
ensure_redis
ensure_etcd
ensure_python_sdk
ensure_browser
ensure_helm_sdk
ensure_promtool

log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
log "cargo build (the end-to-end tests spawn every binary)"
cargo build --workspace --bins --quiet
log "cargo test"
cargo test --workspace --all-targets "$@"
