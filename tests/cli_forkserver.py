"""The test suite's launcher of `python -m diffsynth` processes: it imports the program once, then forks a child
per request that runs `diffsynth/__main__.py` exactly as `python -m diffsynth ARGS` would, in its own process (its
own pid, killable with SIGKILL; its own stdio, cwd and environment).

Why: a render process spends ~9 s of its ~15 s importing torch, diffusers and transformers, and the suite starts a
few hundred of them on a 2-core machine. A fork shares the imported modules and skips that.

What makes the fork safe: this process only imports, it computes nothing, so no torch thread pool exists yet (the
OpenBLAS servers numpy, scipy and cv2 start re-create themselves after a fork). The child re-reads its environment
at run time like any process; nothing the program reads from the environment is read at import.

Protocol (a Unix socket, one connection per process): the client sends one JSON line {argv, env, cwd} with the
child's stdin, stdout and stderr descriptors attached (SCM_RIGHTS); the server answers `pid N` at once and
`exit CODE` when the child ends (CODE as subprocess reports it: negative for a signal).

Run by tests/helpers.py: `python -u tests/cli_forkserver.py SOCKET`; it prints `ready` when it listens and exits
when its parent (the pytest process) is gone. `DIFFSYNTH_TESTS_FRESH_PROCESSES=1` makes the tests start real
processes instead."""

import importlib
import json
import os
import runpy
import select
import socket
import sys
import warnings

# What a small render imports after `diffsynth.render` (sys.modules before and after one), and the other commands'
# modules.
PRELOAD = ["diffsynth.cli", "diffsynth.render", "diffsynth.status", "diffsynth.plan", "diffsynth.smooth_video",
           "diffsynth.diffutoon", "diffsynth.vram", "diffsynth.models.motion", "diffsynth.models.extras",
           "diffsynth.executor", "controlnet_aux", "einops"]


def serve(listener):
    """Accept requests and fork a child for each; returns (in the child only) the argv the child is to run."""
    parent, children = os.getppid(), {}  # pid → the connection waiting for its exit code
    while os.getppid() == parent:
        readable, _, _ = select.select([listener], [], [], 0.05)
        if readable:
            connection, _ = listener.accept()
            message, descriptors, _, _ = socket.recv_fds(connection, 1 << 20, 3)
            request = json.loads(message)
            pid = os.fork()
            if pid == 0:
                for inherited in [listener, connection, *children.values()]:
                    inherited.close()
                for target, descriptor in enumerate(descriptors):
                    os.dup2(descriptor, target)
                    os.close(descriptor)
                os.chdir(request["cwd"])
                os.environ.clear()
                os.environ.update(request["env"])
                sys.path[0] = os.getcwd()  # as `python -m` sets it
                return request["argv"]
            for descriptor in descriptors:
                os.close(descriptor)
            connection.sendall(f"pid {pid}\n".encode())
            children[pid] = connection
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            connection = children.pop(pid, None)
            if connection is not None:
                try:
                    connection.sendall(f"exit {os.waitstatus_to_exitcode(status)}\n".encode())
                except OSError:  # the test gave up on it
                    pass
                connection.close()
    sys.exit(0)


def main():
    with warnings.catch_warnings():  # the child's own imports would be quiet the same way (annotators.py)
        warnings.simplefilter("ignore")
        for name in PRELOAD:
            importlib.import_module(name)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sys.argv[1])
    listener.listen(64)
    print("ready", flush=True)
    argv = serve(listener)
    # The child: from here on it is `python -m diffsynth ARGV`, exit code, atexit and thread shutdown included.
    sys.argv = ["diffsynth", *argv]
    runpy.run_module("diffsynth", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
