"""Runs ``airreg`` command lines in forked child processes, one per request, for the bad-input suite.

Started once (``python cli_zygote.py``), it imports the command line and its heavy dependencies (torch,
SimpleITK) and then, for each JSON request ``{"argv": [...], "cwd": ..., "env": {...}, "stdout": ..., "stderr":
..., "timeout": ...}`` read from stdin, forks a child that runs ``airreg.cli.main(argv)`` exactly as the ``airreg``
console script does (an uncaught exception prints its traceback and exits 1) with its output in the named files.
It answers one JSON line per request: ``{"status": N}`` (the exit status), ``{"signal": N}`` (killed by a signal:
a native crash) or ``{"timeout": true}``. Each command so runs in its own process, a crash fails only its own
case, and the ~2 s import of torch is paid once instead of once per case.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
import traceback


def _child(request: dict) -> None:
    """In the forked child: redirect output, run the command, exit with its status (never returns)."""
    code = 1
    try:
        os.chdir(request["cwd"])
        os.environ.update(request.get("env", {}))
        for fd, name in ((1, request["stdout"]), (2, request["stderr"])):
            target = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        from airreg.cli import main

        sys.argv = ["airreg", *request["argv"]]
        try:
            result = main(request["argv"])
            code = result if isinstance(result, int) else 0
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:  # what the console script does with an uncaught exception
            traceback.print_exc()
            code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def _wait(pid: int, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            if os.WIFSIGNALED(status):
                return {"signal": os.WTERMSIG(status)}
            return {"status": os.WEXITSTATUS(status)}
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return {"timeout": True}
        time.sleep(0.01)


def _warm_up() -> None:
    """Import once what the commands import lazily (torch's optimisers pull in torch._dynamo: seconds)."""
    import torch

    import airreg.benchmark
    import airreg.checkpoint
    import airreg.cli
    import airreg.data
    import airreg.evaluation
    import airreg.patient_check
    import airreg.registration
    import airreg.training  # noqa: F401

    torch.optim.Adam([torch.zeros(1, requires_grad=True)])


def serve() -> None:
    _warm_up()

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        print(json.dumps(_wait(pid, request.get("timeout", 300))), flush=True)


if __name__ == "__main__":
    serve()
