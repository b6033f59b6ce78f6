#!/usr/bin/env bash
# vfdirect: set up this machine and run the main job or the test suite.
#
#   ./vfd.sh demo [ARGS...]   set up, then run the main job: 'vfdirect demo ARGS' (two
#                             hosts, two VMs, live migration under verified IO)
#   ./vfd.sh test [ARGS...]   set up, then run the whole test suite (ARGS go to pytest);
#                             a throwaway PostgreSQL server runs for the inventory tests
#   ./vfd.sh proof [ARGS...]  set up, then run the proof suites (tests/proof: fuzzing,
#                             isolation, power cuts, exhaustion) with longer budgets:
#                             VFDIRECT_FUZZ_SECONDS (default here 60 per target),
#                             VFDIRECT_POWERCUTS (default here 1000); counters printed
#   ./vfd.sh setup            set up only
#
# Setting up means: install the Debian packages vfdirect and its tests use (only those
# missing), create .venv (once) and install vfdirect with its dependencies into it. A second
# run reuses what is there.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
venv="${VFDIRECT_VENV:-$here/.venv}"

# Debian packages: the tools the tests drive (losetup lives in mount/util-linux).
debian_packages=(python3 python3-venv python3-dev gcc util-linux mount e2fsprogs fio qemu-utils libnbd-bin nbdkit
                 qemu-system-x86 busybox-static cpio kmod zstd xz-utils chromium)

log() { printf '[vfd.sh] %s\n' "$*" >&2; }

need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        log "installing Debian packages needs root; run as root or install: $*"
        exit 1
    fi
}

setup_debian() {
    command -v dpkg-query >/dev/null 2>&1 || { log "not a Debian system: skipping apt"; return; }
    local missing=()
    for p in "${debian_packages[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        need_root "${missing[@]}"
        log "apt-get install ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

pick_python() {
    for py in python3.13 python3.12 python3.11 python3; do
        if command -v "$py" >/dev/null 2>&1 && "$py" -c "import sys; sys.exit(sys.version_info < (3, 11))" 2>/dev/null; then
            echo "$py"; return
        fi
    done
    log "no Python >= 3.11 found"; exit 1
}

setup_venv() {
    if [ ! -x "$venv/bin/python" ]; then
        local py; py="$(pick_python)"
        log "creating $venv with $py"
        "$py" -m venv "$venv"
    fi
    local stamp="$venv/.vfdirect-installed"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        log "installing vfdirect and its dependencies into $venv"
        "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
        "$venv/bin/python" -m pip install -q -e ".[test]"
        touch "$stamp"
    fi
}

setup() {
    setup_debian
    setup_venv
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
    setup) setup ;;
    demo)
        setup
        exec "$venv/bin/vfdirect" demo "$@" ;;
    test)
        setup
        # The inventory's PostgreSQL variants need a server: start a throwaway one unless
        # the caller points at their own (VFDIRECT_TEST_PG_URL), and stop it afterwards.
        if [ -z "${VFDIRECT_TEST_PG_URL:-}" ] && [ "${VFDIRECT_NO_PG:-}" != 1 ]; then
            VFDIRECT_TEST_PG_URL="$(scripts/postgres-test-server.sh start)"
            export VFDIRECT_TEST_PG_URL
            trap 'scripts/postgres-test-server.sh stop >/dev/null 2>&1 || true' EXIT
        fi
        "$venv/bin/python" -m pytest "$@" ;;
    proof)
        setup
        export VFDIRECT_FUZZ_SECONDS="${VFDIRECT_FUZZ_SECONDS:-60}"
        export VFDIRECT_POWERCUTS="${VFDIRECT_POWERCUTS:-1000}"
        "$venv/bin/python" -m pytest -s tests/proof "$@" ;;
    *)
        echo "usage: ./vfd.sh demo|test|proof|setup [ARGS...]" >&2
        exit 2 ;;
esac
