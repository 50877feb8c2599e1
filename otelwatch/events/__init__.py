"""Stage 3, read events (pure): what agents write, turned into `Event`s.

- `lines`: one line of stream-json, a transcript, a hook payload or a spool
  record into events; malformed input is `None`, never an exception

No I/O and no clock: the time a line was seen is passed in.
"""
