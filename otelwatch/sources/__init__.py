"""Where sessions and their events come from.

Each source is a small class the daemon polls once per tick:

- `registry.RegistrySource`: `<dir>/<session_id>.json` files written by any program
- `processes.ProcessMatcher`: agent processes found by name in the process table
- `tmux.TmuxSource`: tmux panes and the agent processes under them
- `transcripts.TranscriptLocator`: an agent process's own transcript file
- `spool.SpoolSource`: events recorded by hooks, `otelwatch event` and `otelwatch exec`
- `tail.FileTail`: following one JSON-lines events file
- `inbox.Inbox`: events the Python API and POST /api/events hand to the loop

Deliberately imports nothing: `otelwatch hook` imports `sources.spool` on every
tool call of an agent and must not pay for the other sources.
"""
