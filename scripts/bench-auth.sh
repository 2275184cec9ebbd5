#!/usr/bin/env bash
# Auth API benchmark (release build): session validation through GET /api/v1/sessions/current
# against Portcullis's own /healthz, and logins (Argon2id-bound) against the Argon2id rate
# measured in the same run, with the token endpoint's latency alone and during the login storm.
#
# Usage: scripts/bench-auth.sh [sqlite|postgres]    (ROUNDS=3 DURATION=10s CONNECTIONS=32)
# Needs: wrk, a release build (cargo build --release -p portcullis --examples), and for postgres
# a server at PORTCULLIS_TEST_PG_URL (default postgres://postgres@127.0.0.1:5432/test).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
backend=${1:-sqlite}
target=${BENCH_TARGET:-$here/target/release}
bin=$target/portcullis
[ -x "$bin" ] || { echo "build first: cargo build --release -p portcullis" >&2; exit 1; }
[ -x "$target/examples/argon2_rate" ] || { echo "build first: cargo build --release -p portcullis-core --example argon2_rate" >&2; exit 1; }
command -v wrk >/dev/null || { echo "install wrk: apt-get install wrk" >&2; exit 1; }
ROUNDS=${ROUNDS:-3} DURATION=${DURATION:-10s} CONNECTIONS=${CONNECTIONS:-32}

# shellcheck source=scripts/bench-lib.sh
. "$here/scripts/bench-lib.sh"
# Limits high enough that the benchmark measures work, not refusals.
bench_start "$bin" "$backend" PORTCULLIS_AUTH__ATTEMPTS_PER_ACCOUNT_PER_MINUTE=10000 \
  PORTCULLIS_AUTH__ATTEMPTS_PER_IP_PER_MINUTE=1000000 PORTCULLIS_AUTH__PASSWORD_QUEUE_WAIT_MS=10000
bench_setup_client
password=$(head -c 24 /dev/urandom | base64 | tr -d '=+/')
api /api/v1/organisations/bench/users "{\"email\":\"bench@example.test\",\"password\":\"$password\",\"roles\":[\"api:user\"]}" >/dev/null

# A verified session: the code is logged because no SMTP server is configured.
login=$(curl -fs -H 'content-type: application/json' -d "{\"email\":\"bench@example.test\",\"password\":\"$password\"}" "$url/api/v1/sessions")
session=$(echo "$login" | field session_token); vid=$(echo "$login" | field verification_id)
for _ in $(seq 50); do grep -q 'code=' "$work/err" && break; sleep 0.1; done
code=$(grep -o 'code=[^ ]*' "$work/err" | tail -1 | tr -dc '0-9')
curl -fs -H 'content-type: application/json' -d "{\"verification_id\":\"$vid\",\"code\":\"$code\"}" "$url/api/v1/sessions/verify" >/dev/null

{ cat "$work/done.lua"; echo "wrk.headers[\"Authorization\"] = \"Bearer $session\""; } >"$work/session.lua"
{ cat "$work/done.lua"; cat <<LUA; } >"$work/login.lua"
wrk.method = "POST"
wrk.body = '{"email":"bench@example.test","password":"$password"}'
wrk.headers["Content-Type"] = "application/json"
LUA

echo "== $backend: session validation vs /healthz ($ROUNDS x $DURATION, $CONNECTIONS connections, keep-alive)"
h=(); v=()
for r in $(seq "$ROUNDS"); do
  read -r hv he hp < <(run "$CONNECTIONS" "$work/done.lua" "$url/healthz")
  read -r vv ve vp < <(run "$CONNECTIONS" "$work/session.lua" "$url/api/v1/sessions/current")
  echo "round $r: /healthz ${hv} req/s (errors $he, p99 ${hp}us)  sessions/current ${vv} req/s (errors $ve, p99 ${vp}us)"
  [ "$ve" = 0 ] || { echo "session validation answered errors" >&2; exit 1; }
  h+=("$hv"); v+=("$vv")
done
mh=$(median "${h[@]}"); mv=$(median "${v[@]}")
echo "median: /healthz $mh req/s, sessions/current $mv req/s, ratio $(ratio "$mv" "$mh")"

echo "== $backend: logins alone vs the Argon2id bound; then the token endpoint (1 connection) alone and during a login storm"
l=(); b=()
for r in $(seq "$ROUNDS"); do
  bound=$("$target/examples/argon2_rate" "$(nproc)" | awk '/^RESULT/ {print $2}')
  read -r lv le lp < <(run "$CONNECTIONS" "$work/login.lua" "$url/api/v1/sessions")
  read -r ta te tp < <(run 1 "$work/token.lua" "$url/oauth2/token")
  run 1 "$work/token.lua" "$url/oauth2/token" >"$work/during" &
  bg=$!
  read -r ls lse lsp < <(run "$CONNECTIONS" "$work/login.lua" "$url/api/v1/sessions")
  wait "$bg"; read -r td tde tdp <"$work/during"
  echo "round $r: argon2id bound ${bound}/s  logins ${lv}/s (errors $le, p99 ${lp}us) | token alone ${ta}/s p99 ${tp}us; during a login storm (${ls} logins/s) ${td}/s p99 ${tdp}us (errors $tde)"
  l+=("$lv"); b+=("$bound")
done
ml=$(median "${l[@]}"); mb=$(median "${b[@]}")
echo "median: logins $ml/s, argon2id bound $mb/s, ratio $(ratio "$ml" "$mb")"
