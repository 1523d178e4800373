# Shared by the scripts (standalone, test, fleet, bench): logging, installing
# Debian packages when they are missing. Set LOG_TAG before sourcing.
log() { printf '[%s] %s\n' "${LOG_TAG:-relay}" "$*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_updated=0
apt_install() {
  if [ "$apt_updated" = 0 ]; then
    log "apt-get update"
    as_root apt-get update -qq >/dev/null
    apt_updated=1
  fi
  log "installing $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# What building relay needs besides a Rust toolchain: a C compiler (ring, zstd, the bundled SQLite)
# and make (tikv-jemalloc-sys builds jemalloc with it), from Debian's packages when missing.
ensure_build_tools() {
  local missing=()
  command -v cc >/dev/null || missing+=(gcc libc6-dev)
  command -v make >/dev/null || missing+=(make)
  [ ${#missing[@]} = 0 ] || apt_install "${missing[@]}"
}
