"""`otelwatch top`: a live terminal view of a running daemon's sessions.

- `data`: the HTTP client, the poller thread, what is kept between polls
- `render`: sessions in, lines of styled text out (pure)
- `screen`: the curses painter and the key loop; `top_main`

Imports nothing here: `otelwatch.cli` imports `screen` only when `top` runs.
"""
