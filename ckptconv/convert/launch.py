"""Running one multi-process conversion on this host: ``ckptconv launch -n N -- COMMAND``.

:func:`launch` starts N processes of a command (by default ``ckptconv`` with the given
arguments), each with the jax.distributed settings of one job in its environment: a free
coordinator port on 127.0.0.1 (``JAX_COORDINATOR_ADDRESS``, also the address process 0's
coordination service binds), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``, which
``ckptconv linen-to-nnx`` and ``nnx-to-linen`` read as ``--coordinator``, ``--num-processes``
and ``--process-id``. Their output is streamed line by line, each line prefixed with
``[i]``.

When a process exits with a non-zero status, the others get a few seconds to stop on their own
(they notice through jax.distributed, see :mod:`ckptconv.convert.distributed`), then SIGTERM,
then SIGKILL; the launcher then prints one line naming the process that failed first and exits
with its status (128 + the signal number for a process killed by a signal).

Limits: one host only, for single-host conversions and tests; on a cluster, start one process
per host with the cluster's own launcher and the same three settings.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO

from ..errors import CkptconvError

# Seconds the other processes get to stop on their own after one fails, then after SIGTERM.
DEFAULT_GRACE_SECONDS = 3.0
CONVERT_COMMANDS = ("linen-to-nnx", "nnx-to-linen")
# The status of a process that stopped because another one failed (GroupStoppedError).
STOPPED_STATUS = 3


def free_port(host: str = "127.0.0.1") -> int:
    """Returns a TCP port that is free on ``host`` now (another program may take it later)."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def exit_status(returncode: int) -> int:
    """A process's status as a shell reports it: 128 + N when killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def describe_status(returncode: int) -> str:
    """``exited with status 2`` or ``was killed by SIGKILL``."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with status {returncode}"


def _pump(source: IO[bytes], sink: IO[str], prefix: str, lock: threading.Lock) -> None:
    """Copies ``source`` to ``sink`` line by line, each line prefixed."""
    for raw in iter(source.readline, b""):
        line = raw.decode(errors="replace")
        if not line.endswith("\n"):
            line += "\n"
        with lock:
            sink.write(prefix + line)
            sink.flush()
    source.close()


def launch(
    num_processes: int,
    args: Sequence[str],
    *,
    command: Sequence[str] | None = None,
    env: dict[str, str] | None = None,
    grace_seconds: float = DEFAULT_GRACE_SECONDS,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
) -> int:
    """Runs ``num_processes`` local processes as one jax.distributed job; returns the status.

    Example:
        >>> launch(4, ["linen-to-nnx", "ckpt/2/items", "nnx_ckpt"])  # doctest: +SKIP
        0

    Args:
        num_processes: how many processes to start.
        args: the arguments appended to ``command``.
        command: the program to run; default ``python -m ckptconv.cli`` (then ``args`` must
            start with ``linen-to-nnx`` or ``nnx-to-linen``).
        env: extra environment variables for every process.
        grace_seconds: after a process fails, how long the others get to stop on their own,
            and then how long after SIGTERM before SIGKILL.
        stdout: where the processes' standard output goes, prefixed (default: ours).
        stderr: where their standard error and the launcher's messages go (default: ours).

    Returns:
        0 when every process succeeded, else the status of the first process to fail.

    Raises:
        CkptconvError: ``num_processes`` is below 1, or ``args`` is not a conversion command.
    """
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    if num_processes < 1:
        raise CkptconvError(f"launch: expected at least 1 process, found {num_processes}")
    if command is None:
        command = _conversion_command(args)
    port = free_port()
    address = f"127.0.0.1:{port}"
    lock = threading.Lock()
    events: queue.Queue[tuple[int, int]] = queue.Queue()
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    base_env = {
        **os.environ,
        **(env or {}),
        "JAX_COORDINATOR_ADDRESS": address,
        "JAX_COORDINATOR_BIND_ADDRESS": address,
        "JAX_NUM_PROCESSES": str(num_processes),
        "PYTHONUNBUFFERED": "1",
    }
    try:
        for i in range(num_processes):
            env_i = {**base_env, "JAX_PROCESS_ID": str(i)}
            _start_process(i, [*command, *args], env_i, (out, err), lock, events, procs, pumps)
        with lock:
            pids = ", ".join(str(p.pid) for p in procs)
            err.write(
                f"ckptconv launch: {num_processes} processes (pids {pids}), coordinator {address}\n"
            )
            err.flush()
        first = _supervise(procs, events, grace_seconds)
    except KeyboardInterrupt:
        _stop_all(procs, grace_seconds)
        first = None
        status = 130
    else:
        status = 0 if first is None else exit_status(first[1])
    for pump in pumps:
        pump.join(timeout=grace_seconds)
    if first is not None:
        index, code = first
        with lock:
            err.write(
                f"ckptconv launch: error: process {index} of {num_processes} "
                f"{describe_status(code)} first; the others were stopped\n"
            )
            err.flush()
    return status


def _conversion_command(args: Sequence[str]) -> list[str]:
    """``python -m ckptconv.cli``, once ``args`` is checked to start with a conversion command."""
    if not args or args[0] not in CONVERT_COMMANDS:
        found = args[0] if args else "nothing"
        raise CkptconvError(
            f"launch: expected a command among {', '.join(CONVERT_COMMANDS)} after --, "
            f"found {found}"
        )
    return [sys.executable, "-m", "ckptconv.cli"]


def _start_process(
    index: int,
    argv: list[str],
    env: dict[str, str],
    sinks: tuple[IO[str], IO[str]],
    lock: threading.Lock,
    events: queue.Queue[tuple[int, int]],
    procs: list[subprocess.Popen],
    pumps: list[threading.Thread],
) -> None:
    """Starts process ``index`` of a launch.

    The process goes into ``procs`` at once (so that an interrupt stops it); its output and
    error are pumped into ``sinks`` prefixed ``[index]`` (the threads go into ``pumps``), and
    ``(index, returncode)`` is put on ``events`` when it exits.
    """
    proc = subprocess.Popen(
        argv,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    procs.append(proc)
    for source, sink in zip((proc.stdout, proc.stderr), sinks, strict=True):
        pump = threading.Thread(target=_pump, args=(source, sink, f"[{index}] ", lock))
        pump.daemon = True
        pump.start()
        pumps.append(pump)
    waiter = threading.Thread(target=lambda: events.put((index, proc.wait())))
    waiter.daemon = True
    waiter.start()


def _supervise(
    procs: list[subprocess.Popen], events: queue.Queue[tuple[int, int]], grace: float
) -> tuple[int, int] | None:
    """Waits for every process; once one fails, stops the others (grace, SIGTERM, SIGKILL).

    The process that failed first is the first to exit with an error, not counting those this
    function signalled, and preferring any other error to status 3 (a process that stopped
    because another one failed, which may exit before the one that failed).

    Returns:
        ``(index, returncode)`` of the process that failed first, or ``None``.
    """
    first: tuple[int, int] | None = None
    signalled: set[int] = set()
    escalation = [signal.SIGTERM, signal.SIGKILL]
    deadline: float | None = None
    for _ in range(len(procs)):
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                index, code = events.get(timeout=timeout)
                break
            except queue.Empty:
                sig = escalation.pop(0)
                for i, proc in enumerate(procs):
                    if proc.poll() is None:
                        signalled.add(i)
                        with contextlib.suppress(ProcessLookupError):
                            proc.send_signal(sig)
                deadline = time.monotonic() + grace if escalation else None
        if code == 0 or index in signalled:
            continue
        if first is None or (first[1] == STOPPED_STATUS and code != STOPPED_STATUS):
            first = (index, code)
        if deadline is None and escalation == [signal.SIGTERM, signal.SIGKILL]:
            deadline = time.monotonic() + grace
    return first


def _stop_all(procs: list[subprocess.Popen], grace: float) -> None:
    """Sends SIGTERM to the running processes, then SIGKILL after ``grace`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)
        deadline = time.monotonic() + grace
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.05)
    for proc in procs:
        proc.wait()
