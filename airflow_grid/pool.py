"""A pool of long-lived worker processes for ``airflow-grid run``: start-up paid once per slot, not per candidate.

Each slot is ``python -m airflow_grid.worker serve`` (built by :mod:`airflow_grid.launch`, inside the spec's CPU
and memory budget). Units of work are handed out one at a time to whichever slot is free, so a slow unit never
holds back the others. A slot that dies (out of memory, a fit error under ``error_score: raise``) loses only the
unit in flight - the candidates it finished are in the store - and is replaced while units remain.
"""

from __future__ import annotations

import json
import selectors
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from airflow_grid import launch

Request = dict[str, Any]  # {"indices": [...], "round": r}


@dataclass
class _Slot:
    process: subprocess.Popen[str]
    log: IO[str]
    request: Request | None = None
    pending: str = field(default="")


@dataclass(frozen=True)
class Outcome:
    """A request's reply (``payload``), or why it has none (``failure``: the slot's last output)."""

    request: Request
    payload: dict[str, Any] | None = None
    failure: str | None = None


def run(
    plan_uri: str,
    requests: list[Request],
    *,
    slots: int,
    cpu: float,
    memory_bytes: int,
    scratch: Path,
    start: Callable[[list[str], dict[str, str], IO[str]], subprocess.Popen[str]] | None = None,
) -> Iterator[Outcome]:
    """Run ``requests`` on up to ``slots`` serve workers; yields each request's outcome as it ends."""
    command = launch.worker_command("serve", plan_uri, [], out=None, memory_bytes=memory_bytes)
    env = launch.worker_env(cpu)
    opened = 0

    def spawn() -> _Slot:
        nonlocal opened
        log = open(scratch / f"serve-{opened}.log", "w+")  # noqa: SIM115 (closed when the slot ends)
        opened += 1
        popen = start or _popen
        return _Slot(process=popen(command, env, log), log=log)

    queue = list(requests)
    selector = selectors.DefaultSelector()
    busy: list[_Slot] = []
    idle = [spawn() for _ in range(min(slots, len(queue)))]
    try:
        while queue or busy:
            while queue and idle:
                slot = idle.pop()
                slot.request = queue.pop(0)
                assert slot.process.stdin is not None and slot.process.stdout is not None
                slot.process.stdin.write(json.dumps(slot.request) + "\n")
                slot.process.stdin.flush()
                selector.register(slot.process.stdout, selectors.EVENT_READ, slot)
                busy.append(slot)
            for key, _ in selector.select():
                slot = key.data
                line = key.fileobj.readline()  # type: ignore[union-attr]
                selector.unregister(key.fileobj)
                busy.remove(slot)
                request, slot.request = slot.request, None
                assert request is not None
                if line:
                    yield Outcome(request, payload=json.loads(line))
                    idle.append(slot)
                    continue
                yield Outcome(request, failure=_ended(slot))
                if queue:
                    idle.append(spawn())
    finally:
        for slot in [*idle, *busy]:
            _close(slot)


def _popen(command: list[str], env: dict[str, str], log: IO[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env, text=True, bufsize=1
    )


def _ended(slot: _Slot) -> str:
    """The slot's exit code and last output lines, after it died with a request in flight."""
    code = slot.process.wait()
    slot.log.seek(0)
    tail = "\n".join(slot.log.read().strip().splitlines()[-40:])
    slot.log.close()
    return tail or f"worker exited with {code}"


def _close(slot: _Slot) -> None:
    if slot.process.stdin is not None and not slot.process.stdin.closed:
        slot.process.stdin.close()  # end of requests: the worker exits 0
    try:
        slot.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        slot.process.kill()
        slot.process.wait()
    slot.log.close()
