"""A ticket's consistency score: 1.0 for a run that went as planned, lower for every sign of trouble.

score = max(0, 1 - 0.05*retries - 0.20*loops - 0.25*forged - 0.30*violations - 0.30*contradictions)

- retries: attempts the job itself failed (each one retried or final); attempts the infrastructure
  lost (a dead worker, a vanished job: `AttemptFailed.cause == "infrastructure"`) are counted apart
  (`tickets.infra_failures`) and do not lower the score;
- loops: LoopDetected events (the same failure repeating, or two alternating);
- forged: reports with a bad signature that claimed to be about this ticket;
- violations: other safety violations (denied network, refused binaries, jobs outside the allowlist);
- contradictions: acceptance checks that the reported metrics contradict (a metric check that failed,
  or named a metric its step never reported).
"""

from __future__ import annotations

WEIGHTS = {"retries": 0.05, "loops": 0.20, "forged": 0.25, "violations": 0.30, "contradictions": 0.30}


def consistency_score(retries: int, loops: int, forged: int, violations: int, contradictions: int) -> float:
    """The score, rounded to 4 decimals so that replays compare equal."""
    counts = {
        "retries": retries,
        "loops": loops,
        "forged": forged,
        "violations": violations,
        "contradictions": contradictions,
    }
    penalty = sum(WEIGHTS[k] * max(0, n) for k, n in counts.items())
    return round(max(0.0, 1.0 - penalty), 4)
