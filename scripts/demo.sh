#!/usr/bin/env bash
# `make demo`: the example tickets end to end on the embedded default (private Redis, SQLite,
# daemon and one worker per queue), in a scratch home. Prints the final status.
set -euo pipefail
cd "$(dirname "$0")/.."
home="${1:-$PWD/demo-home}"
jbctl=".venv/bin/jbctl"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" NO_COLOR="${NO_COLOR:-}"
unset JETBOX_REDIS_URL JETBOX_DATABASE_URL JETBOX_TICKETS_DIR
rm -rf "$home"
mkdir -p "$home/tickets"
export JETBOX_HOME="$home"

echo "== validating the example tickets"
"$jbctl" validate tickets/examples/*.yaml tickets/examples/rtx3090/*.yaml
echo
echo "== running them (jbctl up --exit-when-idle) in $home"
for f in tickets/examples/TICKET-*.yaml; do
  "$jbctl" submit "$f" >/dev/null
done
"$jbctl" up --exit-when-idle
echo
echo "== final status"
"$jbctl" status --all
echo
"$jbctl" verify
"$jbctl" replay --check
if "$jbctl" proposals >/dev/null 2>&1; then
  echo
  "$jbctl" proposals
fi
