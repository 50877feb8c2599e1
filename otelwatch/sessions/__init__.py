"""The session table: one session per agent run, from every source at once.

- `table`: merging descriptions from several sources, aliases, binding a
  session to the process identity that held its PID, ended registrations
- `lifecycle`: one session's tick: sample in, verdict, reports, recovery
  view, the end-of-session summary
- `report`: the words of a stalled/stuck report and of a session's summary

Never samples /proc itself and never signals: the probe and the recovery
stage do that.
"""
