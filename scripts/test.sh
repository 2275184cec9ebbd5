#!/usr/bin/env bash
# Portcullis: run the whole test suite.
#
# Usage: scripts/test.sh [extra args passed to the test runner]
#
# Works non-interactively (CI=true, no stdin) on a fresh Debian 12 machine as
# root: installs what the tests need only when missing, makes sure a
# PostgreSQL server is reachable (starting a throwaway one if necessary),
# exports PORTCULLIS_TEST_PG_URL and runs `cargo nextest run --workspace`.
#
# Environment knobs:
#   PORTCULLIS_TEST_PG_URL             admin URL of an existing PostgreSQL server
#   PORTCULLIS_TEST_FORCE_THROWAWAY_PG=1  skip the 127.0.0.1:5432 probe
#   PORTCULLIS_TEST_PG_PORT            first port tried for a throwaway server (55432)
#   PORTCULLIS_TEST_RUNNER             override the test command (e.g. "true")
#   PORTCULLIS_TEST_FUZZ_SECONDS       seconds per cargo-fuzz target in the smoke run after the
#                                      tests (default 5; 0 skips it; docs/fuzzing.md)
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
export PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_ROOT_USER_ACTION=ignore
if [[ "${CI:-}" == "true" ]]; then
    export CARGO_TERM_COLOR=never
fi

DEFAULT_PG_URL="postgres://postgres@127.0.0.1:5432/test"

section() { printf '\n==== %s ====\n' "$*"; }
info() { printf '[test.sh] %s\n' "$*"; }
die() {
    printf '\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n' >&2
    printf '!!! test.sh: FATAL: %s\n' "$*" >&2
    printf '!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n' >&2
    exit 1
}

# ---------------------------------------------------------------- installs --

APT_UPDATED=0
apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "need to install '$*' but apt-get is not available"
    local sudo=()
    if [[ $EUID -ne 0 ]]; then
        command -v sudo >/dev/null 2>&1 || die "need root (or sudo) to install '$*'"
        sudo=(sudo -n)
    fi
    if [[ $APT_UPDATED -eq 0 ]]; then
        info "apt-get update"
        "${sudo[@]}" apt-get update -qq </dev/null >/dev/null || die "apt-get update failed"
        APT_UPDATED=1
    fi
    info "apt-get install $*"
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends "$@" </dev/null >/dev/null \
        || die "apt-get install $* failed"
}

ensure_cmd() { # ensure_cmd COMMAND DEBIAN_PACKAGE
    if ! command -v "$1" >/dev/null 2>&1; then
        apt_install "$2"
    fi
}

ensure_python_deps() {
    ensure_cmd python3 python3
    if python3 -c 'import authlib, joserfc, jwt, requests, aiosmtpd' >/dev/null 2>&1; then
        info "python deps present"
        return
    fi
    if ! python3 -m pip --version >/dev/null 2>&1; then
        apt_install python3-pip
    fi
    local pkgs=(authlib joserfc 'pyjwt[crypto]' requests aiosmtpd)
    info "pip install ${pkgs[*]}"
    if ! python3 -m pip install --quiet "${pkgs[@]}" </dev/null; then
        # Debian's system python is "externally managed" (PEP 668).
        info "retrying pip install with --break-system-packages"
        python3 -m pip install --quiet --break-system-packages "${pkgs[@]}" </dev/null \
            || die "pip install ${pkgs[*]} failed"
    fi
    python3 -c 'import authlib, jwt, requests, aiosmtpd' || die "python deps still not importable after install"
}

# The OpenID Connect end-to-end tests drive Portcullis with npm `openid-client` (v6, pinned by
# crates/portcullis/tests/e2e/package-lock.json) from crates/portcullis/tests/e2e/oidc_rp.mjs.
ensure_node_deps() {
    local dir=crates/portcullis/tests/e2e
    ensure_cmd node nodejs
    ensure_cmd npm npm
    local major
    major=$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)
    [[ "$major" -ge 20 ]] || info "WARNING: Node.js $(node --version 2>/dev/null) is older than 20; openid-client v6 needs 20+"
    if (cd "$dir" && node -e 'import("openid-client").then(() => process.exit(0), () => process.exit(1))') \
        >/dev/null 2>&1; then
        info "node deps present"
        return
    fi
    if [[ -f "$dir/package-lock.json" ]]; then
        info "npm ci in $dir"
        npm ci --no-audit --no-fund --prefix "$dir" </dev/null || die "npm ci in $dir failed"
    else
        info "npm install in $dir"
        npm install --no-audit --no-fund --prefix "$dir" </dev/null || die "npm install in $dir failed"
    fi
    (cd "$dir" && node -e 'import("openid-client").then(() => process.exit(0), () => process.exit(1))') \
        || die "openid-client still not importable after npm install"
}

# The portal's browser test drives Debian's `chromium` with npm `playwright-core` (pinned by
# crates/portcullis/tests/portal/package-lock.json; it downloads no browser of its own).
ensure_portal_browser() {
    local dir=crates/portcullis/tests/portal
    ensure_cmd chromium chromium
    if (cd "$dir" && node -e 'import("playwright-core").then(() => process.exit(0), () => process.exit(1))') \
        >/dev/null 2>&1; then
        info "playwright-core present"
        return
    fi
    info "npm ci in $dir"
    npm ci --no-audit --no-fund --prefix "$dir" </dev/null || die "npm ci in $dir failed"
    (cd "$dir" && node -e 'import("playwright-core").then(() => process.exit(0), () => process.exit(1))') \
        || die "playwright-core still not importable after npm ci"
}

ensure_cargo() {
    if ! command -v cargo >/dev/null 2>&1 && [[ -f "${CARGO_HOME:-$HOME/.cargo}/env" ]]; then
        # shellcheck disable=SC1091
        . "${CARGO_HOME:-$HOME/.cargo}/env"
    fi
    command -v cargo >/dev/null 2>&1 || die "cargo not found in PATH"
}

# -------------------------------------------------------------- postgresql --

PG_TMP=""
PG_BIN=""
PG_RUN_AS=""

pg_reachable() { # pg_reachable URL
    local url=$1
    if command -v psql >/dev/null 2>&1; then
        PGCONNECT_TIMEOUT=3 psql "$url" -Atqc 'select 1' </dev/null >/dev/null 2>&1
    elif command -v pg_isready >/dev/null 2>&1; then
        pg_isready -q -t 3 -d "$url" </dev/null >/dev/null 2>&1
    else
        return 1
    fi
}

port_in_use() { # true if something accepts TCP connections on 127.0.0.1:PORT
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

find_pg_bin() {
    local initdb=""
    if command -v initdb >/dev/null 2>&1; then
        initdb=$(command -v initdb)
    else
        initdb=$(ls -1d /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1 || true)
    fi
    [[ -n "$initdb" ]] || return 1
    PG_BIN=$(dirname "$(readlink -f "$initdb")")
    [[ -x "$PG_BIN/pg_ctl" && -x "$PG_BIN/postgres" ]]
}

# Run a command as the (unprivileged) owner of the throwaway cluster.
as_pg() {
    if [[ -z "$PG_RUN_AS" ]]; then
        "$@"
    elif command -v runuser >/dev/null 2>&1; then
        (cd / && runuser -u "$PG_RUN_AS" -- "$@")
    else
        (cd / && su "$PG_RUN_AS" -s /bin/sh -c "$(printf '%q ' "$@")")
    fi
}

stop_throwaway_pg() {
    [[ -n "$PG_TMP" ]] || return 0
    if [[ -f "$PG_TMP/data/postmaster.pid" ]]; then
        info "stopping throwaway PostgreSQL ($PG_TMP)"
        as_pg "$PG_BIN/pg_ctl" -D "$PG_TMP/data" -m fast -w -t 30 stop >/dev/null 2>&1 \
            || as_pg "$PG_BIN/pg_ctl" -D "$PG_TMP/data" -m immediate -w -t 10 stop >/dev/null 2>&1 \
            || true
    fi
    rm -rf -- "$PG_TMP"
    PG_TMP=""
}

start_throwaway_pg() {
    if ! find_pg_bin; then
        info "PostgreSQL server binaries not found; installing Debian 'postgresql'"
        apt_install postgresql
        find_pg_bin || die "PostgreSQL binaries still not found after installing 'postgresql'"
    fi
    info "using PostgreSQL binaries in $PG_BIN"

    PG_TMP=$(mktemp -d /tmp/portcullis-pg.XXXXXX)
    trap stop_throwaway_pg EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM

    if [[ $EUID -eq 0 ]]; then
        # root cannot run postgres: hand the directory to an unprivileged user.
        if id postgres >/dev/null 2>&1; then
            PG_RUN_AS=postgres
        else
            PG_RUN_AS=nobody
        fi
        chown "$PG_RUN_AS" "$PG_TMP"
    fi
    chmod 700 "$PG_TMP"

    local port=${PORTCULLIS_TEST_PG_PORT:-55432} tries=0
    while port_in_use "$port"; do
        tries=$((tries + 1))
        [[ $tries -lt 50 ]] || die "no free port found for the throwaway PostgreSQL"
        port=$((port + 1))
    done

    info "initdb in $PG_TMP/data (as ${PG_RUN_AS:-$(id -un)})"
    as_pg mkdir -p "$PG_TMP/sock"
    as_pg "$PG_BIN/initdb" -D "$PG_TMP/data" -U postgres -A trust -E UTF8 --locale=C \
        --no-sync >"$PG_TMP/initdb.log" 2>&1 \
        || { cat "$PG_TMP/initdb.log" >&2; die "initdb failed"; }
    cat >>"$PG_TMP/data/postgresql.conf" <<EOF

# portcullis throwaway test server
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$PG_TMP/sock'
max_connections = 200
fsync = off
synchronous_commit = off
full_page_writes = off
EOF

    info "starting throwaway PostgreSQL on 127.0.0.1:$port"
    # Start in the background so pg_ctl does not hold our stdout open.
    if ! as_pg "$PG_BIN/pg_ctl" -D "$PG_TMP/data" -l "$PG_TMP/data/server.log" -w -t 60 start \
        </dev/null >/dev/null 2>&1; then
        cat "$PG_TMP/data/server.log" >&2 || true
        die "could not start the throwaway PostgreSQL"
    fi

    local url="postgres://postgres@127.0.0.1:$port/postgres" i
    for i in $(seq 1 60); do
        if pg_reachable "$url"; then
            PORTCULLIS_TEST_PG_URL=$url
            export PORTCULLIS_TEST_PG_URL
            info "throwaway PostgreSQL ready: $url"
            return 0
        fi
        sleep 0.5
    done
    cat "$PG_TMP/data/server.log" >&2 || true
    die "throwaway PostgreSQL started but is not reachable at $url"
}

ensure_postgres() {
    if [[ -n "${PORTCULLIS_TEST_PG_URL:-}" ]]; then
        if pg_reachable "$PORTCULLIS_TEST_PG_URL"; then
            info "using PORTCULLIS_TEST_PG_URL=$PORTCULLIS_TEST_PG_URL"
            export PORTCULLIS_TEST_PG_URL
            return 0
        fi
        info "WARNING: PORTCULLIS_TEST_PG_URL=$PORTCULLIS_TEST_PG_URL is not reachable"
    fi
    if [[ "${PORTCULLIS_TEST_FORCE_THROWAWAY_PG:-0}" != "1" ]] && pg_reachable "$DEFAULT_PG_URL"; then
        PORTCULLIS_TEST_PG_URL=$DEFAULT_PG_URL
        export PORTCULLIS_TEST_PG_URL
        info "using local PostgreSQL: $PORTCULLIS_TEST_PG_URL"
        return 0
    fi
    info "no reachable PostgreSQL; starting a throwaway server"
    start_throwaway_pg
    [[ -n "${PORTCULLIS_TEST_PG_URL:-}" ]] || die "no PostgreSQL available for the tests"
}

# -------------------------------------------------------------------- main --

main() {
    cd "$(dirname "${BASH_SOURCE[0]}")/.."

    section "Installing test dependencies"
    ensure_cmd curl curl
    ensure_cmd openssl openssl
    ensure_cmd psql postgresql-client   # the PostgreSQL e2e test creates its database with psql
    ensure_python_deps
    ensure_node_deps
    ensure_portal_browser

    section "PostgreSQL"
    ensure_postgres
    # The full-disk test of crash_e2e.rs runs its own server on a tmpfs: it needs the server
    # binaries even when the database in use is somebody else's.
    if ! find_pg_bin; then
        apt_install postgresql
        find_pg_bin || die "PostgreSQL server binaries not found after installing 'postgresql'"
    fi

    local runner=()
    if [[ -n "${PORTCULLIS_TEST_RUNNER:-}" ]]; then
        read -r -a runner <<<"$PORTCULLIS_TEST_RUNNER"
    else
        ensure_cargo
        if cargo nextest --version >/dev/null 2>&1; then
            runner=(nice -n 10 cargo nextest run --workspace --no-fail-fast)
        else
            info "cargo-nextest not available; falling back to cargo test"
            runner=(nice -n 10 cargo test --workspace --no-fail-fast)
        fi
    fi

    section "Running tests: ${runner[*]} $*"
    local status=0
    "${runner[@]}" "$@" </dev/null || status=$?

    # The libFuzzer smoke: every cargo-fuzz target for a few seconds (scripts/fuzz.sh builds
    # them under "$CARGO_TARGET_DIR/fuzz"). Not with a custom runner or extra arguments.
    local fuzz_seconds=${PORTCULLIS_TEST_FUZZ_SECONDS:-5}
    if [[ -z "${PORTCULLIS_TEST_RUNNER:-}" && $# -eq 0 && "$fuzz_seconds" != 0 ]]; then
        section "Fuzz smoke: scripts/fuzz.sh, ${fuzz_seconds} s per target"
        FUZZ_SECONDS=$fuzz_seconds FUZZ_BUILD=dev nice -n 10 scripts/fuzz.sh </dev/null || status=1
    fi

    section "Tests finished with exit status $status"
    exit "$status"
}

# Allow `source scripts/test.sh` to pull in the functions without running.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    main "$@"
fi
