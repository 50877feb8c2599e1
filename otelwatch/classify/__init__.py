"""Stage 4, classify (pure): a session's state and reason from its history.

- `rules`: the verdict: the two CPU bars, the stalled reasons read over the
  window, retries, the one recoverable state

Never does I/O, reads a clock or imports psutil, os, time or an exporter.
"""
