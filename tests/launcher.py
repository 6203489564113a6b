"""torchrun for the tests, without its 2 s of CPU importing torch at each launch.

A server started once per test process imports ``torch.distributed.run``; for each launch it forks a
child that does what ``python -m torch.distributed.run ARGV`` does, in its own session, with the
job's folder and environment, its output to a file. The workers that child starts are the user's:
``python -m ddp.train``. The server is single-threaded, so forking it is safe. Tests of the torchrun
executable itself (signals to it, restarts by hand, scripts) run it as users type it.

Protocol, one JSON line each way: ``{argv, env, cwd, log}`` in; ``{"pid"}`` then ``{"status"}`` out.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch.distributed.run  # what each launch would otherwise import


def serve() -> None:
    """Fork one launcher per request line on stdin; report its pid, then its exit status."""
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            os._exit(_launcher(**job))
        _reply(pid=pid)
        _, status = os.waitpid(pid, 0)
        _reply(status=os.waitstatus_to_exitcode(status))


def _launcher(argv: list[str], env: dict[str, str], cwd: str, log: str) -> int:
    os.setsid()  # its own session: a test's timeout ends the launcher and its workers together
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # not the server's request pipe: nothing of it reaches the job
    sys.argv = ["torchrun", *argv]
    code = 0
    try:
        torch.distributed.run.main(argv)  # what the module runs as __main__
    except SystemExit as e:  # as the interpreter maps it
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # an uncaught exception: its traceback, exit 1
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def _reply(**fields) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    serve()
