#!/usr/bin/env bash
# Instructions per request of one relay-data-plane binary, counted by callgrind (repeatable on a
# shared machine, unlike CPU time). See docs/benchmarks.md, "Per-request costs of the data path".
#
#   target/release/relay-bench env --secs 3000 > /tmp/env.json &      # mocks, control plane, keys
#   scripts/callgrind.sh /tmp/env.json NAME target/release/relay-data-plane [N]
#
# Starts BIN under valgrind as a second data plane of that control plane, sends 300 JSON and 300
# streaming requests to warm it up, zeroes the counters, then N JSON requests (dump "json") and
# N streaming ones (dump "stream"), closed loop, 8 at a time, and prints Ir per request of each.
# The profiles stay in $OUT (default /tmp/relay-callgrind): `callgrind_annotate --inclusive=yes`.
set -euo pipefail
env_json=$1
name=$2
bin=$3
n=${4:-1000}
out_dir=${OUT:-/tmp/relay-callgrind}
mkdir -p "$out_dir"
bench=$(dirname "$0")/../target/release/relay-bench
cp=$(jq -r .control_plane "$env_json")
tok=$(jq -r .dp_token "$env_json")
key=$(jq -r .key "$env_json")
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
dir=$(mktemp -d "$out_dir/dp-XXXX")
out=$out_dir/$name
rm -f "$out".*
RELAY_DATAPLANE_TOKEN=$tok valgrind --tool=callgrind --callgrind-out-file="$out.%p" --dump-instr=no \
  "$bin" --control-plane "$cp" --listen "127.0.0.1:$port" --node-id "callgrind-$name-$$" \
  --data-dir "$dir" --shutdown-grace-secs 1 > "$dir/log" 2>&1 &
vpid=$!
for _ in $(seq 1 600); do
  curl -sf -o /dev/null "http://127.0.0.1:$port/readyz" && break
  sleep 0.2
done
url=http://127.0.0.1:$port/v1/messages
"$bench" load --url "$url" --key "$key" --closed 300 --concurrency 8 > /dev/null
"$bench" load --url "$url" --key "$key" --stream --closed 300 --concurrency 8 > /dev/null
sleep 1
callgrind_control -z "$vpid" > /dev/null
"$bench" load --url "$url" --key "$key" --closed "$n" --concurrency 8 --secs 120 > "$out.json-load"
sleep 2
callgrind_control -d json "$vpid" > /dev/null
"$bench" load --url "$url" --key "$key" --stream --closed "$n" --concurrency 8 --secs 120 > "$out.stream-load"
sleep 2
callgrind_control -d stream "$vpid" > /dev/null
kill -INT "$vpid"
wait "$vpid" || true
for part in json stream; do
  f=$(grep -l "^desc: Trigger: dump $part" "$out".* | head -n 1)
  total=$(grep '^summary:' "$f" | awk '{print $2}')
  ok=$(jq .ok "$out.$part-load")
  echo "$name $part: $total instructions, $ok requests, $((total / ok)) per request ($f)"
done
