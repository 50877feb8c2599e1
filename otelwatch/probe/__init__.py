"""Stage 2, sample: each tracked process tree's resources, read once per tick.

- `proctable`: the process table (pid, ppid, create time, owner, names) read
  from /proc in one pass; the identity every later stage keys on
- `procfs`: the Linux readers: stat, status, FDs and their sockets, the TCP
  tables of a network namespace, wait channels
- `fdmemo`: FD scans carried over for quiet processes of steady sessions
- `psutil_backend`: the portable backend, same samples where there is no /proc
- `backends`: picks the backend (`probe.backend` = auto, procfs, psutil)
- `prober`: one tree sample per session per tick, CPU rates from the previous
  sample, errors turned into sample states (vanished, access_denied, zombie)
- `pool`: the worker pool that runs probes concurrently under `probe_timeout`

Never classifies and never signals. Imports nothing here: `otelwatch hook`
reads the process table and must not pay for the rest.
"""
