"""A Python interpreter started in a runtime's template, waiting for a program.

The template of run-python runs `python3 python-warm.py SOCKET` once before
it is saved: the interpreter starts (the slow part under emulation), listens
on the Unix socket, and the first process detaches and exits. Every clone of
the template wakes with this interpreter waiting in accept(); the run's
command is `byteport-guest warm SOCKET python3 ARGS...`, which sends one JSON
line: its pid, the interpreter's arguments (`-c CODE ARGS...` or
`FILE ARGS...`), its directory and environment. The interpreter takes that
process's standard input, output and error, runs the program as `python3
ARGS...` would, and answers with the exit code. A clone serves one run, so
there is no fork: the interpreter exits with the program.

Nothing here may draw random numbers before the template is saved (every
clone would share them): the `random` module is not imported, and the
kernel reseeds /dev/urandom in each clone (vmgenid).
"""

import io
import json
import os
import runpy
import socket
import sys
import traceback
import types

PREWARM = "print('prewarmed')"


def streams(pid, env):
    """Takes the waiting process's standard streams as this one's."""
    for fd, mode in ((0, os.O_RDONLY), (1, os.O_WRONLY), (2, os.O_WRONLY)):
        src = os.open(f"/proc/{pid}/fd/{fd}", mode)
        os.dup2(src, fd)
        os.close(src)
    unbuffered = bool(env.get("PYTHONUNBUFFERED"))
    sys.stdin = io.TextIOWrapper(
        io.BufferedReader(io.FileIO(0, "r", closefd=False)),
        encoding="utf-8",
        errors="surrogateescape",
    )
    out = io.FileIO(1, "w", closefd=False)
    sys.stdout = io.TextIOWrapper(
        out if unbuffered else io.BufferedWriter(out),
        encoding="utf-8",
        errors="surrogateescape",
        write_through=unbuffered,
    )
    sys.stderr = io.TextIOWrapper(
        io.FileIO(2, "w", closefd=False),
        encoding="utf-8",
        errors="backslashreplace",
        write_through=True,
    )


def exit_code(e):
    """What `python3` exits with for a SystemExit."""
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code & 0xFF
    print(e.code, file=sys.stderr)
    return 1


def run(argv):
    """Runs the program as `python3 ARGS...` would; returns the exit code."""
    try:
        if argv and argv[0] == "-c":
            sys.argv = ["-c"] + argv[2:]
            sys.path[0] = ""
            main = types.ModuleType("__main__")
            sys.modules["__main__"] = main
            exec(compile(argv[1], "<string>", "exec"), main.__dict__)
        else:
            sys.argv = list(argv)
            sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
            runpy.run_path(argv[0], run_name="__main__")
        code = 0
    except SystemExit as e:
        code = exit_code(e)
    except BaseException:
        # The traceback from the program's frames on, as python3 prints it.
        kind, value, tb = sys.exc_info()
        traceback.print_exception(kind, value, tb.tb_next)
        code = 1
    # What the interpreter does at exit: threads, atexit, flushing.
    threading = sys.modules.get("threading")
    if threading is not None:
        threading._shutdown()
    import atexit

    atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
    except BaseException:
        code = 120
    sys.stderr.flush()
    return code


def main():
    path = sys.argv[1]
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    if os.fork():
        # Listening: the template's warm-up command ends here.
        os._exit(0)
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    while True:
        conn, _ = server.accept()
        req = json.loads(conn.makefile("rb").readline())
        env = dict(req["env"])
        streams(req["pid"], env)
        if req.get("prewarm"):
            code = run(["-c", PREWARM])
            conn.sendall(f"{code}\n".encode())
            conn.close()
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            continue
        server.close()
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(env)
        code = run(req["argv"])
        conn.sendall(f"{code}\n".encode())
        os._exit(code)


if __name__ == "__main__":
    main()
