# Shared by scripts/test.sh and scripts/bench.sh: logging and installing
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
