"""The loopback listener: `/metrics`, `/healthz`, `/api/sessions`, `POST /api/events`.

- `server`: the routes and their answers, reading only the loop's last snapshot
- `front`: one selector thread and a small worker pool; connection limits and
  timeouts, so a slow or hostile client costs a file descriptor, never a thread
- `policy`: who may ask what (loopback Host and Origin, JSON only, the client
  socket's owner), decided before a request reaches a route

Never reads /proc on a request path except to name a client socket's owner,
and never blocks the collector loop.
"""
