#!/usr/bin/env bash
# Prepare a Debian 12 machine (or container image) to build, test and run isoscope.
#
#   scripts/setup.sh            system packages + .venv + bcc bridge + kernel access
#   scripts/setup.sh --system   same, but install into the system Python (container images)
#
# Idempotent: every step checks before doing, so a second run is a fast no-op.
# Environment: PYTHON (interpreter for the venv, default python3),
#              ISOSCOPE_KERNEL__HEADERS_DIR (kernel headers to prefer),
#              ISOSCOPE_SKIP_KERNEL=1 (skip tracefs/headers, e.g. during `docker build`).
set -euo pipefail

started=$(date +%s.%N)
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

mode=venv
for arg in "$@"; do
  case "$arg" in
    --system) mode=system ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "setup: unknown option $arg" >&2; exit 2 ;;
  esac
done

log() { printf 'setup: %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
  echo "setup: must run as root (apt packages, tracefs, kernel headers)" >&2
  exit 1
fi

# --- 1. system packages ------------------------------------------------------
packages=(python3-bpfcc bpfcc-tools linux-headers-amd64 prometheus iproute2 libcap2-bin kmod)
# Only Debian's own python3 lacks venv/ensurepip without python3-venv.
if [ "$mode" = venv ] && ! "${PYTHON:-python3}" -c 'import ensurepip, venv' 2>/dev/null; then
  packages+=(python3-venv)
fi
missing=()
for pkg in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
  [ "$status" = "install ok installed" ] || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  log "system packages present"
fi

# --- 2. Python environment ----------------------------------------------------
if [ "$mode" = venv ]; then
  py="$repo/.venv/bin/python"
  if [ ! -x "$py" ]; then
    log "creating .venv with ${PYTHON:-python3}"
    "${PYTHON:-python3}" -m venv "$repo/.venv"
  fi
  pip_flags=()
  target='.[test,lab]'
  stamp="$repo/.venv/.isoscope-setup"
else
  py=$(command -v python3)
  # Debian marks its Python externally managed; an image is ours to manage.
  pip_flags=(--break-system-packages)
  target='.'
  stamp="/var/lib/isoscope/setup-stamp"
fi
"$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "setup: $py is older than Python 3.11" >&2; exit 1; }

want="$(sha256sum pyproject.toml | cut -d' ' -f1) $mode $("$py" -c 'import sys; print(sys.version.split()[0])')"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  log "python dependencies up to date"
else
  log "installing isoscope ($target) into $py"
  "$py" -m pip install -q --disable-pip-version-check "${pip_flags[@]}" -e "$target"
  mkdir -p "$(dirname "$stamp")"
  echo "$want" > "$stamp"
fi

# --- 3. bcc bridge ------------------------------------------------------------
# Debian's bcc is pure Python over libbcc (ctypes): link just that package into
# the environment instead of exposing all of dist-packages. The PyPI package
# named "bcc" is unrelated and must never be installed.
bcc_src=/usr/lib/python3/dist-packages/bcc
if ! "$py" -c 'import bcc, sys; sys.exit(not hasattr(bcc, "BPF"))' 2>/dev/null; then
  site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  log "linking $bcc_src into $site"
  ln -sfn "$bcc_src" "$site/bcc"
  "$py" -c 'import bcc; bcc.BPF' || { echo "setup: bcc still not importable from $py" >&2; exit 1; }
else
  log "bcc importable"
fi

# --- 4. kernel access (the daemon runs the same code at start) ---------------
if [ "${ISOSCOPE_SKIP_KERNEL:-0}" = 1 ]; then
  log "kernel access skipped (ISOSCOPE_SKIP_KERNEL=1)"
else
  # --link-modules: also make the fallback headers visible to every bcc user
  # (bpfcc tools, tests) through /lib/modules/$(uname -r)/{build,source}.
  "$py" -m isoscope.kernel.env --prepare --link-modules \
    || log "warning: kernel access incomplete (see above); eBPF probes will report why"
fi

log "done in $(awk -v s="$started" -v e="$(date +%s.%N)" 'BEGIN { printf "%.2f", e - s }')s"
