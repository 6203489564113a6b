"""torchrun and the ``ddp`` command for the tests, without their 2 to 4 s of CPU importing torch at each launch.

A server started once per test process imports ``torch.distributed.run`` and ``ddp``'s commands; for
each launch it forks a child that does what ``python -m torch.distributed.run ARGV`` (or ``python -m
ddp ARGV``) does, in its own session, with the job's folder and environment, its output to files.
The workers torchrun starts are the user's: ``python -m ddp.train``. The server is single-threaded,
so forking it is safe. Tests of the executables themselves (signals to them, restarts by hand,
scripts, the console script) run them as users type them.

Protocol, one JSON line each way: ``{module, argv, env, cwd, log, err}`` in; ``{"pid"}`` then
``{"status"}`` out.
"""

from __future__ import annotations

import gc
import json
import os
import runpy
import sys
import traceback

import torch._dynamo  # what DDP and the optimizers import in every training process
import torch.distributed.run  # what each launch would otherwise import

import ddp.cli  # what each ddp command would otherwise import
import ddp.train  # noqa: F401  (what ddp train imports)


def serve() -> None:
    """Fork one launcher per request line on stdin; report its pid, then its exit status."""
    gc.freeze()  # the children share the imports' pages instead of copying them in their collections
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            os._exit(_launcher(**job))
        _reply(pid=pid)
        _, status = os.waitpid(pid, 0)
        _reply(status=os.waitstatus_to_exitcode(status))


def _launcher(module: str, argv: list[str], env: dict[str, str], cwd: str, log: str, err: str) -> int:
    os.setsid()  # its own session: a test's timeout ends the launcher and its workers together
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    os.dup2(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND), 1)
    os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_APPEND), 2)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # not the server's request pipe: nothing of it reaches the job
    code = 0
    try:
        if module == "torch.distributed.run":
            sys.argv = ["torchrun", *argv]
            torch.distributed.run.main(argv)  # what the module runs as __main__
        else:  # as ``python -m MODULE`` runs it: the folder it starts in comes first on the path
            sys.argv = [module, *argv]
            sys.path[0] = cwd
            runpy.run_module(module, run_name="__main__", alter_sys=True)
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
