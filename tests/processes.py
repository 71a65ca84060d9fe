"""Starting the child programs of `children.py`, bounded in time and always stopped.

Every child runs in its own session, so `os.killpg` ends it with anything it
started; `stop` is called in `finally` blocks, on timeouts and on failures.
The children also end themselves (`faulthandler` timeout) if a test process
is killed before it can stop them.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

CHILDREN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "children.py")
ROOT = os.path.dirname(os.path.dirname(CHILDREN))


def child_env(tmp_path, **extra) -> dict:
    """The environment of a child: quiet TensorFlow, caches and temporaries in `tmp_path`."""
    temporary = os.path.join(str(tmp_path), "tmp")
    os.makedirs(temporary, exist_ok=True)
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TMPDIR=temporary,
                KERAS_TRANSFER_CACHE=os.path.join(str(tmp_path), "cache"),
                KT_CHILD_TIMEOUT=str(extra.pop("lifetime", 240)), **extra)


def start(args, env, log_path, script=CHILDREN) -> subprocess.Popen:
    """Starts `children.py ARGS` (or `python ARGS` for `script=None`) in its own session.

    It runs in the checkout's root (so it imports this `keras_transfer`), its
    output going to `log_path`.
    """
    log = open(log_path, "ab")
    command = [sys.executable, *([script] if script else []), *map(str, args)]
    try:
        return subprocess.Popen(command, env=env, cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        log.close()  # the child holds its own copy


def stop(process: subprocess.Popen) -> None:
    """Kills the child's whole process group if it still runs, and reaps it."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()


def wait_all(processes, timeout: float) -> list:
    """Waits for every process (stopping all at the first failure); returns exit codes.

    A code is None for a process stopped at the timeout.
    """
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            codes = [p.poll() for p in processes]
            if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
                break
            time.sleep(0.2)
        return [p.poll() for p in processes]
    finally:
        for process in processes:
            stop(process)


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 right now (bound, read, released)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def start_workers(count: int, args, tmp_path, **extra) -> list:
    """Starts `count` workers of one multi-worker cluster on 127.0.0.1 (TF_CONFIG)."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(count)]}
    processes = []
    try:
        for index in range(count):
            config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
            env = child_env(tmp_path, TF_CONFIG=json.dumps(config), **extra)
            processes.append(start(args, env, os.path.join(str(tmp_path), f"worker-{index}.log")))
    except BaseException:
        for process in processes:
            stop(process)
        raise
    return processes


def tail(path, characters: int = 3000) -> str:
    """The end of a log, without TensorFlow's startup lines."""
    try:
        with open(path, errors="replace") as f:
            lines = [line for line in f if not line.startswith(("I0000", "WARNING: All"))]
    except OSError:
        return "(no log)"
    return "".join(lines)[-characters:]
