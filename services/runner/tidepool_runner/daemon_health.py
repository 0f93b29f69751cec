"""Health checks of every running sandbox's toolbox daemon, and what the runner does when one stops answering.

Why (issue #7 item 8): a daemon that no longer answers left its sandbox `started` while every toolbox call
hung. Now the runner asks the daemon of each sandbox it has reported `started` for `GET /version` every
`daemon_health_interval_seconds`: one small request on the pooled, verified connection
(daemon_connections.py), from its own task, so it costs the toolbox traffic nothing. Checks of different
sandboxes run concurrently; an incident in one never delays the others.

After `daemon_health_failures` checks in a row without an answer within `daemon_health_timeout_seconds`:

1. Under the sandbox's job lock (no start, stop or destroy of it runs meanwhile) the runner makes sure
   the container still runs and the daemon still does not answer.
2. It sends SIGUSR1 to the container through the engine. The container's init forwards it to the daemon's
   supervisor, which kills its serving worker and starts a fresh one on the same socket (see the daemon's
   supervisor.py). The user's processes keep running; no host process id is involved, so this works
   wherever the runner reaches the engine, and it can only ever affect that one container.
3. If the toolbox answers within `daemon_restart_wait_seconds`, a `restarted` DaemonHealthEvent says why
   it was restarted (the API lists it among the sandbox's events). Otherwise a `restart_failed` event
   follows and the sandbox is reported `error`, `recoverable`, with a reason saying how to recover (stop
   and start it); the proxy then answers its toolbox calls at once instead of letting them hang.
4. A sandbox this checker put in `error` whose daemon answers again later (its supervisor got to run
   after all) is reported `started` again, with a `recovered` event.

A socket that fails the runner's checks (a link, not a socket, or a foreign peer: the sandbox's root
replaced its own toolbox channel, see daemon_connections.py) counts as an unanswered check too: the
toolbox is unusable either way (its calls are refused), so the same restart runs, and when the channel is
still not the daemon's afterwards, the sandbox is reported `error` (recoverable: a stop and a start
restores the channel, the start removes whatever is at the socket's path). The events and the error
reason say what the check found, with the socket's path as the sandbox sees it.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import aiohttp
import structlog

from tidepool_contracts import channels
from tidepool_contracts.models import (
    DaemonHealthEvent,
    DaemonHealthOutcome,
    SandboxRoute,
    SandboxStateEvent,
)
from tidepool_contracts.states import SandboxState
from tidepool_runner.container_config import (
    ORGANIZATION_LABEL,
    SANDBOX_LABEL,
    SOCKET_MOUNT_DIR,
    container_name,
)
from tidepool_runner.daemon_connections import (
    DAEMON_BASE_URL,
    DaemonConnections,
    UntrustedDaemonSocketError,
)
from tidepool_runner.engine import (
    ContainerEngine,
    ContainerStatus,
    EngineUnavailableError,
    SandboxFailedError,
)
from tidepool_runtime.broker import Bus, KeyValue, kv_get, kv_put
from tidepool_runtime.locks import SandboxLocks
from tidepool_runtime.settings import RunnerSettings

log = structlog.get_logger("tidepool.runner.daemon_health")

RESTART_SIGNAL = "SIGUSR1"  # the daemon supervisor's "replace your worker" (see its supervisor.py)
EVENT_SOURCE = "runner.health"
# While waiting for a restarted daemon: how long each probe may take, and how long between probes.
_RESTART_PROBE_TIMEOUT_SECONDS = 2.0
_RESTART_PROBE_INTERVAL_SECONDS = 0.2
# A sandbox using this share of its pid limit is saturated (see `_at_process_limit`).
_PROCESS_LIMIT_SHARE = 0.9


@dataclass
class _Tracked:
    organization_id: str
    failures: int = 0
    # What the last unanswered check found, for the events: see `_probe`.
    problem: str = ""
    # Put in `error` by this checker (not by a job): reported `started` again once the daemon answers.
    errored: bool = False
    incident: asyncio.Task[None] | None = None


@dataclass
class DaemonHealthChecker:
    settings: RunnerSettings
    runner_id: str
    engine: ContainerEngine
    daemons: DaemonConnections
    bus: Bus
    routes: KeyValue
    locks: SandboxLocks
    _tracked: dict[str, _Tracked] = field(default_factory=dict)

    async def run_forever(self) -> None:
        while True:
            try:
                await self.check_once()
            except Exception as error:  # the engine or the bus is away for a moment: next round
                log.warning("daemon_health.check_failed", error=str(error))
            await asyncio.sleep(self.settings.daemon_health_interval_seconds)

    async def check_once(self) -> None:
        """One round: probe every running sandbox this runner reported `started` (or put in `error`)."""
        running = {
            container.labels[SANDBOX_LABEL]: container.labels.get(ORGANIZATION_LABEL, "")
            for container in await self.engine.list_sandboxes()
            if container.state == "running" and container.labels.get(SANDBOX_LABEL)
        }
        for gone in set(self._tracked) - set(running):
            tracked = self._tracked.pop(gone)
            if tracked.incident is not None:
                tracked.incident.cancel()
        checks = [self._check(sandbox_id, organization_id) for sandbox_id, organization_id in running.items()]
        await asyncio.gather(*checks)

    async def close(self) -> None:
        incidents = [t.incident for t in self._tracked.values() if t.incident is not None]
        for incident in incidents:
            incident.cancel()
        for incident in incidents:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await incident

    async def _check(self, sandbox_id: str, organization_id: str) -> None:
        tracked = self._tracked.setdefault(sandbox_id, _Tracked(organization_id))
        if tracked.incident is not None and not tracked.incident.done():
            return  # a restart is under way
        route = await kv_get(self.routes, sandbox_id, SandboxRoute)
        if route is None or route.runner_id != self.runner_id:
            return
        if route.state == SandboxState.STARTED:
            tracked.errored = False  # (re)started by a job since
        elif not (route.state == SandboxState.ERROR and tracked.errored):
            tracked.failures = 0
            return  # starting, stopping or failed by a job: the job owns the state
        version, problem = await self._probe(sandbox_id, self.settings.daemon_health_timeout_seconds)
        if version is not None:
            tracked.failures = 0
            if tracked.errored and route.state == SandboxState.ERROR:
                await self._recovered(sandbox_id, tracked, version)
            return
        if tracked.errored:
            return  # still not answering; already reported
        tracked.failures += 1
        tracked.problem = problem
        log.info("daemon_health.no_answer", sandbox_id=sandbox_id, failures=tracked.failures, problem=problem)
        if tracked.failures >= self.settings.daemon_health_failures:
            tracked.incident = asyncio.create_task(
                self._restart(sandbox_id, tracked), name=f"daemon-restart-{sandbox_id}"
            )

    async def _probe(self, sandbox_id: str, timeout: float) -> tuple[str | None, str]:
        """`(version, "")` if the daemon answers `GET /version` within `timeout` seconds, else `(None, why)`:
        why it did not, as a phrase for the events, e.g. "the toolbox daemon did not answer GET /version
        within 5 s" or "the toolbox socket failed the runner's checks (/run/tidepool/toolbox.sock is a
        symbolic link)" (paths as the sandbox sees them: the events are the tenant's)."""
        no_answer = f"the toolbox daemon did not answer GET /version within {timeout:g} s"
        try:
            async with self.daemons.session(sandbox_id).get(
                f"{DAEMON_BASE_URL}/version", timeout=aiohttp.ClientTimeout(total=timeout)
            ) as response:
                body = await response.json(content_type=None)
                if response.status != 200:
                    return None, f"the toolbox daemon answered GET /version with HTTP {response.status}"
        except aiohttp.ClientConnectorError as error:
            if isinstance(error.os_error, UntrustedDaemonSocketError):
                return None, self._untrusted(sandbox_id, error.os_error)
            return None, no_answer
        except UntrustedDaemonSocketError as error:
            return None, self._untrusted(sandbox_id, error)
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
            return None, no_answer
        version = body.get("version") if isinstance(body, dict) else None
        return (version if isinstance(version, str) else "unknown"), ""

    def _untrusted(self, sandbox_id: str, error: UntrustedDaemonSocketError) -> str:
        detail = str(error).replace(str(self.daemons.socket_dir(sandbox_id)), SOCKET_MOUNT_DIR)
        return f"the toolbox socket failed the runner's checks ({detail})"

    async def _restart(self, sandbox_id: str, tracked: _Tracked) -> None:
        settings = self.settings
        why = f"{tracked.problem} in {tracked.failures} checks in a row"
        try:
            async with self.locks.hold(sandbox_id):
                status = await self.engine.inspect(container_name(sandbox_id))
                if status is None or not status.running or status.paused:
                    return  # stopped or removed meanwhile: nothing to restart
                route = await kv_get(self.routes, sandbox_id, SandboxRoute)
                if route is None or route.state != SandboxState.STARTED:
                    return
                version, _ = await self._probe(sandbox_id, settings.daemon_health_timeout_seconds)
                if version is not None:
                    return  # answers again on its own
                if await self._at_process_limit(sandbox_id, status):
                    return
                log.warning("daemon_health.restarting", sandbox_id=sandbox_id, why=why)
                await self.engine.signal(status.container_id, RESTART_SIGNAL)
                # Pooled connections belong to the killed worker.
                await self.daemons.close(sandbox_id)
                wait = settings.daemon_restart_wait_seconds
                version, problem = await self._wait_for_answer(sandbox_id, wait)
                if version is not None:
                    await self._publish_health(
                        sandbox_id,
                        tracked,
                        DaemonHealthOutcome.RESTARTED,
                        f"{why}; its worker was restarted and it answers again",
                    )
                    return
                reason = (
                    f"{why}, and still did not answer {wait:g} s after a restart ({problem}); the "
                    "sandbox's processes may still run. Recoverable: stop and start the sandbox"
                )
                await self._publish_health(sandbox_id, tracked, DaemonHealthOutcome.RESTART_FAILED, reason)
                if self.locks.queued(sandbox_id):
                    # A stop, start or destroy asked for meanwhile waits for this lock: it settles the state
                    # (an `error` now would end the user's wait for `stopped` with a failure).
                    return
                await self._report(sandbox_id, tracked, SandboxState.ERROR, error_reason=reason)
                tracked.errored = True
        except (EngineUnavailableError, SandboxFailedError) as error:
            # The engine is away or the container ended meanwhile: try again from the next checks.
            log.warning("daemon_health.restart_failed", sandbox_id=sandbox_id, error=str(error))
        except Exception:  # the bus is away for a moment: the next checks try again
            log.exception("daemon_health.restart_error", sandbox_id=sandbox_id)
        finally:
            tracked.failures = 0

    async def _at_process_limit(self, sandbox_id: str, status: ContainerStatus) -> bool:
        """True when the sandbox's processes fill (nearly) all of its pid limit, e.g. a fork bomb. Its
        daemon is then starved, not wedged, and a new worker could not even be forked; killing the worker
        would only lose what it holds: the deadlines that end such a tree at its command's timeout."""
        if status.pids_limit <= 0:
            return False
        count = await self.engine.process_count(status.container_id)
        if count is None or count < status.pids_limit * _PROCESS_LIMIT_SHARE:
            return False
        log.warning(
            "daemon_health.at_process_limit", sandbox_id=sandbox_id, processes=count, limit=status.pids_limit
        )
        return True

    async def _wait_for_answer(self, sandbox_id: str, within: float) -> tuple[str | None, str]:
        """`_probe` until it answers or `within` seconds have passed: the last probe's outcome."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        problem = f"the toolbox daemon did not answer GET /version within {within:g} s"
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None, problem
            version, problem = await self._probe(sandbox_id, min(_RESTART_PROBE_TIMEOUT_SECONDS, remaining))
            if version is not None:
                return version, ""
            await asyncio.sleep(_RESTART_PROBE_INTERVAL_SECONDS)

    async def _recovered(self, sandbox_id: str, tracked: _Tracked, version: str) -> None:
        async with self.locks.hold(sandbox_id):
            route = await kv_get(self.routes, sandbox_id, SandboxRoute)
            if route is None or route.state != SandboxState.ERROR:
                return  # a job has taken over meanwhile
            await self._report(sandbox_id, tracked, SandboxState.STARTED, daemon_version=version)
            tracked.errored = False
            await self._publish_health(
                sandbox_id, tracked, DaemonHealthOutcome.RECOVERED, "the toolbox daemon answers again"
            )

    async def _publish_health(
        self, sandbox_id: str, tracked: _Tracked, outcome: DaemonHealthOutcome, reason: str
    ) -> None:
        log.warning("daemon_health.event", sandbox_id=sandbox_id, outcome=str(outcome), reason=reason)
        event = DaemonHealthEvent(
            sandbox_id=sandbox_id, organization_id=tracked.organization_id, outcome=outcome, reason=reason
        )
        await self.bus.publish(
            channels.DAEMON_EVENTS, event, msg_id=f"daemon-health:{event.incident_id}", sandbox_id=sandbox_id
        )

    async def _report(
        self,
        sandbox_id: str,
        tracked: _Tracked,
        state: SandboxState,
        *,
        error_reason: str | None = None,
        daemon_version: str | None = None,
    ) -> None:
        # Route first, like the job executor: the proxy answers from the route's state.
        route = SandboxRoute(
            sandbox_id=sandbox_id,
            organization_id=tracked.organization_id,
            runner_id=self.runner_id,
            runner_url=self.settings.effective_runner_url,
            state=state,
        )
        await kv_put(self.routes, sandbox_id, route)
        event = SandboxStateEvent(
            sandbox_id=sandbox_id,
            organization_id=tracked.organization_id,
            state=state,
            error_reason=error_reason,
            recoverable=state == SandboxState.ERROR,
            runner_id=self.runner_id,
            daemon_version=daemon_version,
            source=EVENT_SOURCE,
        )
        msg_id = f"health:{sandbox_id}:{state}:{event.occurred_at.isoformat()}"
        await self.bus.publish(channels.SANDBOX_EVENTS, event, msg_id=msg_id, sandbox_id=sandbox_id)
