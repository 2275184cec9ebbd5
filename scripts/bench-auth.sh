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

work=$(mktemp -d)
db_args=()
cleanup() {
  [ -n "${pid:-}" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
  [ -n "${pgdb:-}" ] && psql -q "$pgadmin" -c "DROP DATABASE IF EXISTS $pgdb WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
if [ "$backend" = postgres ]; then
  pgadmin=${PORTCULLIS_TEST_PG_URL:-postgres://postgres@127.0.0.1:5432/test}
  pgdb=portcullis_bench_$$
  psql -q "$pgadmin" -c "CREATE DATABASE $pgdb" >/dev/null
  db_args=(--database-url "${pgadmin%/*}/$pgdb")
fi

admin_secret=$(head -c 32 /dev/urandom | base64 | tr -d '=+/' | head -c 43)
# Limits high enough that the benchmark measures work, not refusals.
PORTCULLIS_ADMIN_CLIENT_SECRET=$admin_secret PORTCULLIS_LOG__LEVEL=warn,portcullis=info \
  PORTCULLIS_AUTH__ATTEMPTS_PER_ACCOUNT_PER_MINUTE=10000 PORTCULLIS_AUTH__ATTEMPTS_PER_IP_PER_MINUTE=1000000 \
  PORTCULLIS_AUTH__PASSWORD_QUEUE_WAIT_MS=10000 \
  "$bin" serve --listen 127.0.0.1:0 --data-dir "$work/data" "${db_args[@]}" >"$work/out" 2>"$work/err" &
pid=$!
for _ in $(seq 100); do grep -q 'listening on' "$work/err" && break; sleep 0.1; done
url=$(grep -o 'listening on http://[0-9.:]*' "$work/err" | sed 's/listening on //' || true)
[ -n "$url" ] || { cat "$work/err" >&2; exit 1; }

field() { sed "s/.*\"$1\":\"\\([^\"]*\\)\".*/\\1/"; }
tok=$(curl -fs -u "portcullis\$admin:$admin_secret" -d grant_type=client_credentials "$url/oauth2/token" | field access_token)
api() { curl -fs -H "authorization: Bearer $tok" -H 'content-type: application/json' -d "$2" "$url$1"; }
api /api/v1/organisations '{"slug":"bench","name":"Bench"}' >/dev/null
api /api/v1/organisations/bench/services '{"slug":"api","name":"API","audience":"https://api.example","scopes":["api/read"],"roles":["api:user"]}' >/dev/null
csecret=$(api /api/v1/organisations/bench/applications '{"slug":"client","name":"Bench client","scopes":["api/read"]}' | field client_secret)
password=$(head -c 24 /dev/urandom | base64 | tr -d '=+/')
api /api/v1/organisations/bench/users "{\"email\":\"bench@example.test\",\"password\":\"$password\",\"roles\":[\"api:user\"]}" >/dev/null

# A verified session: the code is logged because no SMTP server is configured.
login=$(curl -fs -H 'content-type: application/json' -d "{\"email\":\"bench@example.test\",\"password\":\"$password\"}" "$url/api/v1/sessions")
session=$(echo "$login" | field session_token); vid=$(echo "$login" | field verification_id)
for _ in $(seq 50); do grep -q 'code=' "$work/err" && break; sleep 0.1; done
code=$(grep -o 'code=[^ ]*' "$work/err" | tail -1 | tr -dc '0-9')
curl -fs -H 'content-type: application/json' -d "{\"verification_id\":\"$vid\",\"code\":\"$code\"}" "$url/api/v1/sessions/verify" >/dev/null

cat >"$work/done.lua" <<'LUA'
done = function(summary, latency, requests)
  io.write(string.format("RESULT %.1f %d %d\n", summary.requests / (summary.duration / 1e6),
    summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(99)))
end
LUA
{ cat "$work/done.lua"; echo "wrk.headers[\"Authorization\"] = \"Bearer $session\""; } >"$work/session.lua"
{ cat "$work/done.lua"; cat <<LUA; } >"$work/login.lua"
wrk.method = "POST"
wrk.body = '{"email":"bench@example.test","password":"$password"}'
wrk.headers["Content-Type"] = "application/json"
LUA
{ cat "$work/done.lua"; cat <<LUA; } >"$work/token.lua"
wrk.method = "POST"
wrk.body = "grant_type=client_credentials&scope=api%2Fread"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
wrk.headers["Authorization"] = "Basic $(printf '%s' "bench\$client:$csecret" | base64 -w0)"
LUA
run() { wrk -t1 -c"$1" -d"$DURATION" -s "$2" "$3" | awk '/^RESULT/ {print $2, $3, $4}'; }
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

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
echo "median: /healthz $mh req/s, sessions/current $mv req/s, ratio $(awk -v a="$mv" -v b="$mh" 'BEGIN {printf "%.2f", a/b}')"

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
echo "median: logins $ml/s, argon2id bound $mb/s, ratio $(awk -v a="$ml" -v b="$mb" 'BEGIN {printf "%.2f", a/b}')"
