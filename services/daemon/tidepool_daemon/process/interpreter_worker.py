"""The code interpreter's REPL worker: passed to `python3 -u -c` by the daemon, never imported by it.

Invocation: `python3 -u -c <this file's text> <request fd> <reply fd>`, stdin on /dev/null, stdout and
stderr on pipes the daemon streams to the client. One worker is one interpreter context: its `__main__`
globals persist from one execution to the next.

Protocol (both directions): frames of a 4-byte big-endian length followed by that many bytes of UTF-8
JSON. The daemon sends `{"code", "envs", "marker"}`; the worker runs the code, then writes `marker` to
both stdout and stderr (so the daemon knows it has all the output of this execution, even output that
subprocesses wrote straight to the inherited descriptors) and replies `{"error": null | {name, value,
traceback}}`. SIGINT interrupts a running execution (the daemon's timeout) as KeyboardInterrupt. Once
started, before the first request, the worker writes one `{"ready": true}` frame.
"""

import sys


def _tidepool_worker() -> None:
    import builtins
    import contextlib
    import json
    import linecache
    import os
    import signal
    import struct
    import traceback
    import types

    request_fd, reply_fd = int(sys.argv[1]), int(sys.argv[2])
    sys.argv = [""]
    main_module = types.ModuleType("__main__")
    main_module.__dict__["__builtins__"] = builtins
    sys.modules["__main__"] = main_module
    namespace = main_module.__dict__

    def read_exactly(size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = os.read(request_fd, size - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def write_all(fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]

    def describe(exc: BaseException, tb) -> dict:
        return {
            "name": type(exc).__name__,
            "value": str(exc),
            "traceback": "".join(traceback.format_exception(type(exc), exc, tb)),
        }

    running = [False]

    def interrupt(signum, frame) -> None:
        # Only a running execution is interrupted; a late SIGINT must not kill the worker's own loop.
        if running[0]:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    # Ready: the daemon starts the user's timeout only now, so start-up is never counted against it.
    ready = json.dumps({"ready": True}).encode("utf-8")
    write_all(reply_fd, struct.pack("!I", len(ready)) + ready)

    execution = 0
    while True:
        try:
            (length,) = struct.unpack("!I", read_exactly(4))
            request = json.loads(read_exactly(length).decode("utf-8"))
        except EOFError:
            return
        execution += 1
        marker = request["marker"].encode("utf-8")
        envs = request.get("envs") or {}
        saved_env = {name: os.environ.get(name) for name in envs}
        os.environ.update(envs)
        error = None
        try:
            filename = f"<cell-{execution}>"
            source = request["code"]
            linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
            try:
                code = compile(source, filename, "exec", dont_inherit=True)
            except (SyntaxError, ValueError, OverflowError) as exc:
                error = describe(exc, None)
            else:
                running[0] = True
                try:
                    exec(code, namespace)
                except SystemExit as exc:
                    if exc.code not in (None, 0):
                        error = describe(exc, None)
                except BaseException as exc:
                    # Drop this worker's own frame: the traceback starts in the user's code.
                    error = describe(exc, exc.__traceback__.tb_next if exc.__traceback__ else None)
                finally:
                    running[0] = False
        except BaseException as exc:  # e.g. KeyboardInterrupt landing outside the user's code
            error = describe(exc, None)
        finally:
            for name, value in saved_env.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        write_all(1, marker)
        write_all(2, marker)
        reply = json.dumps({"error": error}).encode("utf-8")
        write_all(reply_fd, struct.pack("!I", len(reply)) + reply)


_tidepool_worker()
