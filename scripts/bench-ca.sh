#!/usr/bin/env bash
# CA benchmark (release build): certificate issuance through POST …/certificates (CSR parse and
# signature check, profile, signing, inventory row + audit row) against Portcullis's own /healthz
# in the same run, and the in-process CRL rebuild with 100,000 revoked entries.
#
# Usage: scripts/bench-ca.sh [sqlite|postgres]    (ROUNDS=3 DURATION=10s CONNECTIONS=16)
# Needs: wrk, openssl, and `cargo build --release -p portcullis -p portcullis-web --examples`.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
backend=${1:-sqlite}
target=${BENCH_TARGET:-$here/target/release}
bin=$target/portcullis
[ -x "$bin" ] || { echo "build first: cargo build --release -p portcullis" >&2; exit 1; }
[ -x "$target/examples/crl_rebuild" ] || { echo "build first: cargo build --release -p portcullis-web --example crl_rebuild" >&2; exit 1; }
command -v wrk >/dev/null || { echo "install wrk: apt-get install wrk" >&2; exit 1; }
ROUNDS=${ROUNDS:-3} DURATION=${DURATION:-10s} CONNECTIONS=${CONNECTIONS:-16}

# shellcheck source=scripts/bench-lib.sh
. "$here/scripts/bench-lib.sh"
bench_start "$bin" "$backend"
bench_setup_client
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$work/k.pem" \
  -subj '/CN=bench$client/O=bench' -out "$work/c.csr" 2>/dev/null
csr=$(awk '{printf "%s\\n", $0}' "$work/c.csr")
{ cat "$work/done.lua"; cat <<LUA; } >"$work/issue.lua"
wrk.method = "POST"
wrk.body = [[{"type":"transport","application":"client","csr":"$csr"}]]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $tok"
LUA
api /api/v1/organisations/bench/certificates "{\"type\":\"transport\",\"application\":\"client\",\"csr\":\"$csr\"}" >/dev/null

issue=() health=()
for r in $(seq "$ROUNDS"); do
  read -r i ie ip99 < <(run "$CONNECTIONS" "$work/issue.lua" "$url/api/v1/organisations/bench/certificates")
  read -r h he hp99 < <(run "$CONNECTIONS" "$work/done.lua" "$url/healthz")
  echo "round $r: issue $i/s (errors $ie, p99 ${ip99}us)  healthz $h/s (errors $he)"
  issue+=("$i") health+=("$h")
done
mi=$(median "${issue[@]}") mh=$(median "${health[@]}")
echo "median: issue $mi certificates/s, healthz $mh/s, ratio $(ratio "$mi" "$mh")"
"$target/examples/crl_rebuild"
