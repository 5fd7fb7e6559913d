"""The processes of one multi-process conversion, coordinated through jax.distributed.

:func:`initialize` starts (or joins) a :func:`jax.distributed.initialize` job with gloo
collectives on CPU. The processes then meet at barriers and exchange a few strings through the
job's coordination service (its key-value store, which process 0 serves), polled, rather than
through collectives, so that every wait can also notice two things:

- another process failed: before stopping, a process records a one-line reason under
  ``failed/<i>``, and every other process stops at its next check with
  ``process <i> of <n> failed: <reason>``;
- the processes stopped making progress: a wait gives up, naming the processes it waits for,
  once ``timeout`` seconds pass without any process reporting progress or arriving.

A process that dies without a word (killed, out of memory) is noticed by the coordination
service itself once it misses its heartbeats for :data:`HEARTBEAT_SECONDS`; jax.distributed then
terminates every other process of the job (a multi-line fatal message that names the dead
task). A killed process 0 takes the service with it, and the others terminate as soon as they
next reach it. ``ckptconv launch`` does not wait for any of this: it stops the others as soon
as one process exits with an error.

Limits: this reads the client of the running job from ``jax._src.distributed.global_state``,
as Orbax's multihost utilities do; there is no public accessor in jax 0.10.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from typing import Protocol

from ..errors import CkptconvError

DEFAULT_TIMEOUT = 300.0
# Read when the number of processes or this process's index is not given (ckptconv launch sets
# them; jax.distributed itself reads only JAX_COORDINATOR_ADDRESS, or a cluster environment).
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"
_POLL_SECONDS = 0.05
# A process that sends no heartbeat for this long is taken for dead, and jax.distributed then
# terminates every other process (its default is 100 s). Heartbeats come from a C++ thread, so
# a busy process keeps sending them.
HEARTBEAT_SECONDS = 30
_runs = itertools.count()


class ProcessGroupError(CkptconvError):
    """The processes of a multi-process conversion cannot work together."""


class GroupStoppedError(ProcessGroupError):
    """This process stopped because another one failed, or because the processes stalled.

    Attributes:
        exit_code: the CLI's exit status for it (3), which tells ``ckptconv launch`` that
            this process is not the one that failed.
    """

    exit_code = 3


class KeyValueClient(Protocol):
    """What :class:`ProcessGroup` needs of jax.distributed's ``DistributedRuntimeClient``."""

    def key_value_set(self, key: str, value: str, allow_overwrite: bool = False) -> None:
        """Stores ``value`` under ``key``."""
        ...

    def key_value_dir_get(self, key: str) -> list[tuple[str, str]]:
        """Returns every ``(key, value)`` whose key starts with ``key``."""
        ...


class ProcessGroup:
    """The processes of one multi-process run: barriers, shared values and failure reports.

    Every process creates its groups (and subgroups) in the same order, so that they share a
    namespace in the key-value store; each conversion works in a subgroup of its own.

    Example:
        >>> group = initialize("10.0.0.1:1234", num_processes=4, process_id=i)
        >>> if group.is_leader:
        ...     group.publish("folder", "/ckpt/.out.tmp")
        >>> folder = group.wait_for("folder")
        >>> group.barrier("written")

    Args:
        client: the job's key-value client.
        process_id: this process's index, ``0 <= process_id < num_processes``.
        num_processes: how many processes take part.
        timeout: seconds a wait goes on without any process making progress.
        namespace: the key prefix of this run, the same in every process.
    """

    def __init__(
        self,
        client: KeyValueClient,
        process_id: int,
        num_processes: int,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        namespace: str | None = None,
    ) -> None:
        if not 0 <= process_id < num_processes:
            raise ProcessGroupError(
                f"expected a process id in [0, {num_processes}), found {process_id}"
            )
        self.process_id = process_id
        self.num_processes = num_processes
        self.timeout = timeout
        self._client = client
        self._ns = namespace if namespace is not None else f"ckptconv/run{next(_runs)}"
        self._progress = 0
        self._children = itertools.count()

    def __repr__(self) -> str:
        return f"ProcessGroup({self.process_id} of {self.num_processes}, {self._ns!r})"

    def subgroup(self) -> ProcessGroup:
        """Returns the same processes under a fresh namespace (one per conversion).

        Every process must call this the same number of times, in the same order.
        """
        return ProcessGroup(
            self._client,
            self.process_id,
            self.num_processes,
            timeout=self.timeout,
            namespace=f"{self._ns}/{next(self._children)}",
        )

    @property
    def is_leader(self) -> bool:
        """Whether this is process 0, which makes the folder and commits."""
        return self.process_id == 0

    def publish(self, name: str, value: str) -> None:
        """Shares ``value`` under ``name`` with every process (once per name)."""
        self._client.key_value_set(f"{self._ns}/value/{name}", value)
        self.report_progress()

    def wait_for(self, name: str, *, publisher: int = 0) -> str:
        """Waits until process ``publisher`` publishes ``name``; returns the value.

        Raises:
            GroupStoppedError: another process failed, or none made progress for
                :attr:`timeout` seconds.
        """
        key = f"{self._ns}/value/{name}"
        return self._wait(lambda kv: kv.get(key), f"for {name!r}", {publisher})

    def barrier(self, name: str) -> None:
        """Waits until every process reaches the barrier ``name``.

        Raises:
            GroupStoppedError: another process failed, or none made progress for
                :attr:`timeout` seconds (the message names the processes that did not arrive).
        """
        prefix = f"{self._ns}/barrier/{name}/"
        self._client.key_value_set(f"{prefix}{self.process_id}", "1")
        everyone = set(range(self.num_processes))
        waiting = set(everyone)  # updated in place: the timeout message names who is missing

        def arrived(kv: dict[str, str]) -> bool | None:
            waiting.clear()
            waiting.update(everyone - {int(k[len(prefix) :]) for k in kv if k.startswith(prefix)})
            return None if waiting else True

        self._wait(arrived, f"at barrier {name!r}", waiting)

    def report_progress(self) -> None:
        """Tells the other processes that this one is making progress (see :attr:`timeout`)."""
        self._progress += 1
        self._client.key_value_set(
            f"{self._ns}/progress/{self.process_id}", str(self._progress), allow_overwrite=True
        )

    def check(self) -> None:
        """Raises if another process has reported a failure.

        Raises:
            GroupStoppedError: naming the failed process and its reason.
        """
        self._raise_failed(dict(self._client.key_value_dir_get(f"{self._ns}/failed/")))

    def fail(self, reason: str) -> None:
        """Reports this process's failure to the others (best effort: the service may be gone)."""
        try:
            self._client.key_value_set(
                f"{self._ns}/failed/{self.process_id}",
                " ".join(reason.split()) or "failed",
                allow_overwrite=True,
            )
        except Exception:  # noqa: BLE001 - nothing more can be done; the caller raises anyway
            pass

    def stopped(self) -> None:
        """Tells the leader that this process has stopped writing (best effort)."""
        try:
            self._client.key_value_set(
                f"{self._ns}/stopped/{self.process_id}", "1", allow_overwrite=True
            )
        except Exception:  # noqa: BLE001 - the leader then waits for its timeout only
            pass

    def wait_stopped(self, timeout: float) -> None:
        """Waits (at most ``timeout`` seconds) until every other process has stopped writing.

        Used by the leader before it deletes the folder the others write into; never raises.
        """
        prefix = f"{self._ns}/stopped/"
        deadline = time.monotonic() + timeout
        others = set(range(self.num_processes)) - {self.process_id}
        while time.monotonic() < deadline:
            try:
                done = {int(k[len(prefix) :]) for k, _ in self._client.key_value_dir_get(prefix)}
            except Exception:  # noqa: BLE001 - the service is gone: nobody is left to wait for
                return
            if others <= done:
                return
            time.sleep(_POLL_SECONDS)

    def _raise_failed(self, failed: dict[str, str]) -> None:
        if not failed:
            return
        by_id = sorted((int(k.rsplit("/", 1)[1]), v) for k, v in failed.items())
        pid, reason = by_id[0]
        more = f" (and processes {', '.join(str(i) for i, _ in by_id[1:])})" if by_id[1:] else ""
        raise GroupStoppedError(f"process {pid} of {self.num_processes} failed{more}: {reason}")

    def _wait(self, done, what: str, waiting: set[int]):
        """Polls the key-value store until ``done(kv)`` returns a value other than ``None``."""
        progress_prefix = f"{self._ns}/progress/"
        failed_prefix = f"{self._ns}/failed/"
        seen = None
        since = time.monotonic()
        while True:
            kv = dict(self._client.key_value_dir_get(f"{self._ns}/"))
            self._raise_failed({k: v for k, v in kv.items() if k.startswith(failed_prefix)})
            result = done(kv)
            if result is not None:
                return result
            state = sorted((k, v) for k, v in kv.items() if k.startswith(progress_prefix))
            state.append(("waiting", ",".join(map(str, sorted(waiting)))))
            now = time.monotonic()
            if state != seen:
                seen, since = state, now
            elif now - since > self.timeout:
                names = ", ".join(str(i) for i in sorted(waiting))
                raise GroupStoppedError(
                    f"process {self.process_id} of {self.num_processes} waited {what} for "
                    f"{self.timeout:g} s without progress from any process; still waiting for "
                    f"process{'es' if len(waiting) > 1 else ''} {names}"
                )
            time.sleep(_POLL_SECONDS)


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
) -> ProcessGroup:
    """Joins (starting if needed) the jax.distributed job; returns this run's group.

    Settings left ``None`` are read from ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (which
    ``ckptconv launch`` sets), else found as :func:`jax.distributed.initialize` finds them:
    the coordinator from ``JAX_COORDINATOR_ADDRESS``, the others from a cluster environment it
    recognises (SLURM, Open MPI, Kubernetes, Cloud TPU). CPU collectives use gloo.

    Args:
        coordinator: ``HOST:PORT`` of process 0's coordination service.
        num_processes: how many processes take part.
        process_id: this process's index.
        timeout: seconds to wait for the other processes to connect, and for progress in
            every later wait (see :class:`ProcessGroup`).

    Returns:
        The group of a new run.

    Raises:
        ProcessGroupError: the settings are incomplete, or the job cannot be joined.
    """
    import jax
    from jax._src import distributed as jax_distributed

    try:
        if num_processes is None and os.environ.get(NUM_PROCESSES_ENV):
            num_processes = int(os.environ[NUM_PROCESSES_ENV])
        if process_id is None and os.environ.get(PROCESS_ID_ENV):
            process_id = int(os.environ[PROCESS_ID_ENV])
    except ValueError as e:
        raise ProcessGroupError(
            f"{NUM_PROCESSES_ENV}={os.environ.get(NUM_PROCESSES_ENV)!r}, "
            f"{PROCESS_ID_ENV}={os.environ.get(PROCESS_ID_ENV)!r}: expected integers"
        ) from e
    state = jax_distributed.global_state
    if state.client is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
        if coordinator and process_id:
            _wait_for_port(coordinator, timeout)
        try:
            jax.distributed.initialize(
                coordinator_address=coordinator,
                num_processes=num_processes,
                process_id=process_id,
                initialization_timeout=max(1, int(timeout)),
                heartbeat_timeout_seconds=HEARTBEAT_SECONDS,
                shutdown_timeout_seconds=max(1, int(min(timeout, HEARTBEAT_SECONDS))),
            )
        except (ValueError, TypeError, RuntimeError) as e:
            raise ProcessGroupError(
                f"cannot join the jax.distributed job (coordinator {coordinator}, "
                f"{num_processes} processes, process id {process_id}): "
                f"{' '.join(str(e).split())[:500]}"
            ) from e
    elif (num_processes, process_id) != (None, None) and (num_processes, process_id) != (
        state.num_processes,
        state.process_id,
    ):
        raise ProcessGroupError(
            f"jax.distributed is already initialized as process {state.process_id} of "
            f"{state.num_processes}, not {process_id} of {num_processes}"
        )
    return ProcessGroup(state.client, state.process_id, state.num_processes, timeout=timeout)


def _wait_for_port(address: str, timeout: float) -> None:
    """Waits until something listens at ``HOST:PORT`` (process 0's coordination service).

    A client that connects before the service listens waits out gRPC's reconnect backoff
    (about a second) before it tries again; starting every process at once makes that likely.
    Gives up silently after ``timeout`` seconds: jax.distributed then reports the failure.
    """
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if not port.isdigit():
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            return
        except OSError:
            time.sleep(0.02)
