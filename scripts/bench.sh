#!/usr/bin/env bash
# Token endpoint benchmark: Portcullis (release build) vs node oidc-provider, plus Portcullis's
# own /healthz measured with the same wrk settings in the same run.
#
# Usage: scripts/bench.sh [sqlite|postgres]     (ROUNDS, DURATION, CONNECTIONS as in the peer script)
# Needs: wrk, node/npm, a release build (cargo build --release -p portcullis), and for postgres
# a server at PORTCULLIS_TEST_PG_URL (default postgres://postgres@127.0.0.1:5432/test).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
backend=${1:-sqlite}
bin=${BENCH_BIN:-$here/target/release/portcullis}
peer=${PEER_SCRIPT:-$here/../shared/peers/oidc-provider/token-bench.sh}
[ -x "$bin" ] || { echo "build first: cargo build --release -p portcullis" >&2; exit 1; }
command -v wrk >/dev/null || { echo "install wrk: apt-get install wrk" >&2; exit 1; }
export ROUNDS=${ROUNDS:-3} DURATION=${DURATION:-10s} CONNECTIONS=${CONNECTIONS:-32}

# shellcheck source=scripts/bench-lib.sh
. "$here/scripts/bench-lib.sh"
bench_start "$bin" "$backend"
bench_setup_client

echo "== $backend: token endpoint vs oidc-provider ($ROUNDS x $DURATION, $CONNECTIONS connections)"
PORTCULLIS_TOKEN_URL="$url/oauth2/token" CLIENT_ID='bench$client' CLIENT_SECRET="$client_secret" SCOPE=api/read "$peer"

echo "== $backend: token endpoint vs Portcullis /healthz (same wrk settings)"
h=(); t=()
for r in $(seq "$ROUNDS"); do
  read -r hv he hp < <(run "$CONNECTIONS" "$work/done.lua" "$url/healthz")
  read -r tv te tp < <(run "$CONNECTIONS" "$work/token.lua" "$url/oauth2/token")
  echo "round $r: /healthz ${hv} req/s (errors $he, p99 ${hp}us)  token ${tv} tok/s (errors $te, p99 ${tp}us)"
  h+=("$hv"); t+=("$tv")
done
mh=$(median "${h[@]}"); mt=$(median "${t[@]}")
echo "median: /healthz $mh req/s, token $mt tok/s, token/healthz $(ratio "$mt" "$mh")"
