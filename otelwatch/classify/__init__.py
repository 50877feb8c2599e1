"""Stage 4, classify (pure): a session's state and reason from its history.

- `rules`: the verdict: the two CPU bars, the stalled reasons, retries, blind
  sessions, the one recoverable state
- `window`: what the window's samples prove, kept incrementally (`SampleWindow`)
- `tooltree`: a tool at work seen in the process tree
- `backoff`: when a stalled or stuck session is reported again
- `lateness`: when a tick came so late that the watchdog itself was not watching

Never does I/O, reads a clock or imports psutil, os, time or an exporter.
"""
