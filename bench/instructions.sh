#!/bin/bash
# Instructions a session of a pop3d source tree, from callgrind (bench/session_cost.py).
#
#   bench/instructions.sh TREE WORK login|fetch N [--no-log]
#
# TREE: a checkout (its src/ and bench/ are used); WORK: a work folder kept by
# `bench/run.py --keep` (its pop3d/ is hard-linked into a fresh temporary copy per run,
# as a session locks its maildrop).  Prints instructions a login session, or a fetched
# message for fetch (N sessions of 100 RETR).  Repeat runs agree within ~1.5 %; run the
# trees compared alternately.  KEEP=FILE keeps the callgrind profile.
set -euo pipefail
tree=$(cd "$1" && pwd); work=$(cd "$2" && pwd); mode=$3; n=$4; shift 4
here=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cp -al "$work/pop3d" "$tmp/pop3d"
rm -f "$tmp/pop3d/session_cost.log"
(cd "$tree" && PYTHONHASHSEED=0 PYTHONPATH="$tree/src:$tree/bench" valgrind --tool=callgrind \
    --callgrind-out-file="$tmp/cg.out" --collect-atstart=no --toggle-collect=sys_call_tracing \
    "$here/.venv/bin/python" "$tree/bench/session_cost.py" "$tmp/pop3d" "$mode" "$n" "$@" \
    > "$tmp/log" 2>&1) || { cat "$tmp/log"; exit 1; }
total=$(grep -m1 '^summary:\|^totals:' "$tmp/cg.out" | awk '{print $2}')
per=$n; unit="login session"
if [ "$mode" = fetch ]; then per=$((n * 100)); unit="fetched message"; fi
echo "$tree $mode: $total instructions over $n sessions, $((total / per)) a $unit"
[ -n "${KEEP:-}" ] && cp "$tmp/cg.out" "$KEEP"
exit 0
