"""tmux panes and the agent processes under them: `TmuxSource`.

Owns the runtime axis of a session: a pane can outlive its agent, and that
must show as `runtime_alive_process_dead`, not as alive. Each scan lists the
panes of every tmux server the user can reach (sockets in
`$TMUX_TMPDIR/tmux-UID/`, default `/tmp/tmux-UID/`, or the sockets given),
maps each agent PID to the pane whose shell it runs under, and remembers
which agent each pane had, so a pane whose agent died is reported with
`agent_pid=None` and `last_agent_pid` set.

Panes on any server: each agent's own `TMUX` (socket path, server pid) and
`TMUX_PANE` (pane id) from /proc/PID/environ name its server and pane, so
another user's server or another `TMUX_TMPDIR` is found too. Such a server is
listed every scan; when its server pid is not alive (tmux kill-server) the
pane is no runtime. A server otelwatch may not connect to (another user's,
without write access to its socket) but whose pid lives gives the pane by its
id (`%N`, a target tmux accepts). Every pane carries its socket, so two servers'
same-named sessions never collide.

The runtime is re-checked, not remembered: `pane_of` answers from the last
scan (each tick), and `recheck` asks the pane's own server again at the moment
an agent is found dead, so an agent that took its pane (and its server) with
it is not reported as having left a live pane behind.

Every tmux call has a timeout: a hung server costs at most `timeout` seconds,
is counted in `timeouts`, and the scan goes on with the other servers. tmux
is run with an argv list, never through a shell, and nothing from a pane is
executed.
"""

from __future__ import annotations

import logging
import os
import stat
import subprocess
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from otelwatch.probe.proctable import ProcessTable
from otelwatch.sources.agent_dirs import read_environ

__all__ = ["PaneInfo", "TmuxSource", "default_sockets"]

log = logging.getLogger("otelwatch.sources.tmux")

_FORMAT = "#{session_name}:#{window_index}.#{pane_index}\t#{pane_pid}\t#{pane_dead}\t#{pane_id}\t#{pid}"
_ENV = (b"TMUX", b"TMUX_PANE")


@dataclass(frozen=True)
class _Listed:
    target: str
    pane_pid: int
    dead: bool
    pane_id: str = ""  # "%3"
    server_pid: int | None = None


def parse_tmux_env(env: dict[str, str]) -> tuple[str, int, str] | None:
    """(socket, server pid, pane id) from an agent's TMUX and TMUX_PANE; None when absent."""
    value, pane = env.get("TMUX", ""), env.get("TMUX_PANE", "")
    parts = value.rsplit(",", 2)
    if len(parts) != 3 or not parts[0].startswith("/") or not pane.startswith("%"):
        return None
    try:
        return parts[0], int(parts[1]), pane
    except ValueError:
        return None


@dataclass(frozen=True)
class PaneInfo:
    target: str  # "session:window.pane"
    pane_pid: int  # the pane's first process (usually a shell)
    agent_pid: int | None  # the agent running in the pane now
    socket: str  # the tmux server's socket path
    last_agent_pid: int | None = None  # the agent seen in this pane before; set when it is gone
    pane_dead: bool = False  # the pane's own process exited (remain-on-exit keeps the pane)
    pane_id: str = ""  # tmux's own id of the pane ("%3")

    @property
    def agent_gone(self) -> bool:
        """The pane lives on but the agent that ran in it does not."""
        return self.agent_pid is None and self.last_agent_pid is not None


def default_sockets(uid: int | None = None, environ: dict[str, str] | None = None) -> list[str]:
    env = os.environ if environ is None else environ
    uid = os.geteuid() if uid is None else uid
    base = os.path.join(env.get("TMUX_TMPDIR") or "/tmp", f"tmux-{uid}")
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return []
    out = []
    for name in names:
        path = os.path.join(base, name)
        try:
            if stat.S_ISSOCK(os.stat(path).st_mode):
                out.append(path)
        except OSError:
            continue
    return out


class TmuxSource:
    def __init__(self, timeout: float = 1.0, tmux: str = "tmux", sockets: Sequence[str] | None = None) -> None:
        self.timeout = timeout
        self.tmux = tmux
        self.sockets = None if sockets is None else list(sockets)
        self.timeouts = 0  # tmux calls that overran the timeout
        self.errors = 0  # tmux calls that failed otherwise (not "no server running")
        self.available = True  # False once the tmux binary turned out to be missing
        # (socket, target) -> agent pid last seen in that pane
        self._last_agent: dict[tuple[str, str], int] = {}
        self._panes: list[PaneInfo] = []
        self._env: dict[int, tuple[float, tuple[str, int, str] | None]] = {}  # pid -> (create_time, TMUX)

    def _agent_tmux(self, table: ProcessTable, pid: int) -> tuple[str, int, str] | None:
        """The agent's own (socket, server pid, pane id), read once per process."""
        info = table.get(pid)
        if info is None:
            return None
        cached = self._env.get(pid)
        if cached is not None and cached[0] == info.create_time:
            return cached[1]
        found = parse_tmux_env(read_environ(pid, wanted=_ENV))
        self._env[pid] = (info.create_time, found)
        return found

    def scan(self, table: ProcessTable, agent_pids: Collection[int]) -> list[PaneInfo]:
        """All panes now, each with the agent under it (or the one it had before)."""
        if not self.available:
            return []
        sockets = list(self.sockets if self.sockets is not None else default_sockets())
        agent_pids = set(agent_pids)
        for pid in [p for p in self._env if p not in agent_pids]:
            del self._env[pid]
        own: dict[int, tuple[str, int, str]] = {}  # agent pid -> its (socket, server pid, pane id)
        for pid in agent_pids:
            found = self._agent_tmux(table, pid)
            if found is not None and found[1] in table:  # a dead server's pane is no runtime
                own[pid] = found
                if found[0] not in sockets:
                    sockets.append(found[0])
        raw: list[tuple[str, _Listed]] = []
        unreachable: set[str] = set()
        for sock in sockets:
            listed = self._list_panes(sock, strict=True)
            if listed is None:
                unreachable.add(sock)
            raw.extend((sock, pane) for pane in listed or ())
        pane_of_pid = {pane.pane_pid: i for i, (_, pane) in enumerate(raw)}
        pane_of_id = {(sock, pane.pane_id, pane.server_pid): i for i, (sock, pane) in enumerate(raw)}

        # Each agent belongs to the pane its own TMUX_PANE names, else to the nearest pane
        # process above it (or is one).
        agent_of_pane: dict[int, tuple[int, int]] = {}  # pane index -> (depth, agent pid)
        extra: list[PaneInfo] = []
        for pid in agent_pids:
            mine = own.get(pid)
            if mine is not None:
                idx = pane_of_id.get((mine[0], mine[2], mine[1]))
                if idx is not None:
                    best = agent_of_pane.get(idx)
                    if best is None or best[0] > 0:
                        agent_of_pane[idx] = (0, pid)
                    continue
                if mine[0] in unreachable:
                    # Its server lives but will not talk to us (another user's socket): the pane
                    # by its id, which tmux takes as a target.
                    extra.append(PaneInfo(mine[2], 0, pid, mine[0], pane_id=mine[2]))
                    continue
            chain = [pid, *table.ancestors(pid)]
            for depth, p in enumerate(chain):
                idx = pane_of_pid.get(p)
                if idx is not None:
                    best = agent_of_pane.get(idx)
                    if best is None or depth < best[0]:
                        agent_of_pane[idx] = (depth, pid)
                    break

        panes: list[PaneInfo] = []
        seen: set[tuple[str, str]] = set()
        for idx, (sock, pane) in enumerate(raw):
            target, pane_pid, dead = pane.target, pane.pane_pid, pane.dead
            key = (sock, target)
            seen.add(key)
            agent = agent_of_pane.get(idx)
            if agent is not None:
                self._last_agent[key] = agent[1]
                panes.append(PaneInfo(target, pane_pid, agent[1], sock, pane_dead=dead, pane_id=pane.pane_id))
            else:
                panes.append(PaneInfo(target, pane_pid, None, sock, last_agent_pid=self._last_agent.get(key),
                                      pane_dead=dead, pane_id=pane.pane_id))
        panes.extend(extra)
        for key in list(self._last_agent):
            if key not in seen:
                del self._last_agent[key]  # the pane is gone: forget its agent
        self._panes = panes
        return panes

    def pane_alive(self, target: str, socket: str | None = None) -> bool:
        """Whether the last scan saw this pane (on `socket`, or on any server)."""
        return any(p.target == target and (socket is None or p.socket == socket) for p in self._panes)

    def pane_of(self, pid: int) -> PaneInfo | None:
        """The pane whose agent (now or before) was `pid`, from the last scan."""
        for p in self._panes:
            if p.agent_pid == pid or (p.agent_pid is None and p.last_agent_pid == pid):
                return p
        return None

    def recheck(self, pane: PaneInfo, agent_pid: int) -> bool | None:
        """Whether `pane` still lives now that its agent `agent_pid` is gone: one fresh call
        to its server. A pane whose own process was the agent closes with it unless tmux
        keeps it (remain-on-exit: `pane_dead`), so still listing it alive a moment after
        the agent died is the pane on its way out. None when the server did not answer."""
        listed = self._list_panes(pane.socket, strict=True)
        if listed is None:
            return None
        for p in listed:
            if p.target == pane.target and p.pane_pid == pane.pane_pid:
                return p.dead or p.pane_pid != agent_pid
        return False

    def _list_panes(self, sock: str, strict: bool = False) -> list[_Listed] | None:
        """Every pane of the server at `sock`; [] when there is none (or no server), and
        with `strict`, None when that could not be told (no answer, or not ours to ask)."""
        argv = [self.tmux, "-S", sock, "list-panes", "-a", "-F", _FORMAT]
        failed: list[_Listed] | None = None if strict else []
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=self.timeout, check=False)
        except subprocess.TimeoutExpired:
            self.timeouts += 1
            log.warning("tmux server %s did not answer within %.1f s", sock, self.timeout)
            return failed
        except FileNotFoundError:
            self.available = False
            log.info("tmux not found (%s); tmux source off", self.tmux)
            return failed
        except OSError as exc:
            self.errors += 1
            log.warning("cannot run tmux for %s: %s", sock, exc)
            return failed
        if proc.returncode != 0:
            # A stale socket of a server that is gone is normal, not an error.
            msg = proc.stderr.decode("utf-8", "replace")
            if "Permission denied" in msg or "access not allowed" in msg:
                return failed  # a live server we may not ask (another user's): not "no server"
            if "no server running" not in msg and "error connecting" not in msg:
                self.errors += 1
                return failed
            return []
        out = []
        for line in proc.stdout.decode("utf-8", "replace").splitlines():
            parts = line.split("\t")
            if len(parts) not in (3, 5):
                continue
            try:
                server = int(parts[4]) if len(parts) == 5 and parts[4].strip().isdigit() else None
                out.append(_Listed(parts[0], int(parts[1]), parts[2].strip() == "1",
                                   parts[3] if len(parts) == 5 else "", server))
            except ValueError:
                continue
        return out
