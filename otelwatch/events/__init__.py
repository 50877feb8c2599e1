"""Stage 3, read events (pure): what agents write, turned into `Event`s, and what
a session's events add up to.

- `lines`: one line of stream-json, a transcript, a hook payload or a spool
  record into events; malformed input is `None`, never an exception
- `activity`: the event state machine (`Activity.apply`): clocks, the open
  turn and who opened it, open and background tool calls, announced retries

No I/O and no clock: the time a line was seen is passed in.
"""
