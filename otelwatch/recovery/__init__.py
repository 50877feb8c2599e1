"""Opt-in recovery of provably hung sessions: the public names, re-exported.

`coordinator.Recovery` is what the daemon drives; `policy` decides (pure),
`escalation` is the state machine whose worker takes a recovery's steps,
`actuator` does the I/O (signals, commands, the state file), `state` parses the
state file. This file holds no logic.
"""

from otelwatch.recovery.coordinator import Recovery
from otelwatch.recovery.policy import Decision, PolicyContext, SessionView

__all__ = ["Decision", "PolicyContext", "Recovery", "SessionView"]
