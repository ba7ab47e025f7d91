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

echo "== validating the example tickets and the demo plan"
"$jbctl" validate tickets/examples/TICKET-*.yaml tickets/examples/rtx3090/*.yaml
"$jbctl" plan validate tickets/examples/plan-demo.yaml
echo
echo "== applying the plan (its milestones M0 and M1 write TICKET-1 to 5 into the tickets folder)"
# TICKET-6 (inference) and TICKET-7 (an adapter) need an approved core: submitted after approval.
"$jbctl" plan apply tickets/examples/plan-demo.yaml
echo
echo "== running them (jbctl up --exit-when-idle) in $home"
"$jbctl" up --exit-when-idle
echo
echo "== final status"
"$jbctl" status --all
echo
"$jbctl" verify
"$jbctl" replay --check
echo
echo "== a fanned-out step: TICKET-1's shapes ran as two shard jobs, joined by the decider (no join job)"
"$jbctl" events --type SubtasksPlanned --type ShardsJoined
echo
echo "== the step cache: TICKET-4's shapes step (two shards and their joined manifest) is TICKET-1's, generated once (REUSED 1)"
"$jbctl" cache ls
"$jbctl" events --type AttemptReused
echo
echo "== proposals waiting for a human (the core changes only with jbctl approve)"
"$jbctl" proposals --detail
echo
echo "== milestones (reports in $home/reports)"
"$jbctl" milestones
for m in M0 M1; do
  "$jbctl" milestone "$m" --report md -o "$home/reports/$m.md" 2>/dev/null
  echo "$m deliverables:"
  grep '^- \[' "$home/reports/$m.md" | sed 's/^/  /'
done
echo
echo "Look around: JETBOX_HOME=$home $jbctl status TICKET-1 | describe | events | audit | sql \"SELECT ...\""
echo "After approving, run inference on the new core: JETBOX_HOME=$home $jbctl up, then"
echo "  $jbctl submit tickets/examples/TICKET-6.yaml   (and TICKET-7.yaml, an adapter on the core reasoner)"
