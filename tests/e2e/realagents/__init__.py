"""The real-agent conformance suite: real Claude Code and Codex CLIs against fake APIs.

`fakeapi` speaks the model APIs (and misbehaves on purpose), `netns` runs a CLI
next to one inside its own network namespace, `harness` starts the daemon and
the scenarios and records every session's verdict timeline, `tui` runs the
interactive TUI in a tmux pane of a private tmux server and drives it as a
person would (`test_real_tui`). Nothing here
reaches beyond loopback: each CLI runs in a namespace whose only interface is
`lo`.
"""
