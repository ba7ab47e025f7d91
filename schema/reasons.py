"""Words that start recorded reasons, shared by the planner and the read side (no imports: `jbctl
status` reads them without loading the ticket models)."""

PROBE_FAILED = "probe failed"  # how a TaskBlocked reason starts when a probe of the step's inputs failed
