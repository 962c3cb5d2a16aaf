"""A stand-in for `python -m <sglang server or router> ... --port P ...` in the launcher's own tests.

What those tests check is process bookkeeping (every process the launcher started, and every child in its group, is
stopped; the CLI records and stops exactly those PIDs), not serving, so a real model server would only cost a minute
of start-up per cluster. This one answers `/health` and `/readiness` on 127.0.0.1:P and, like an SGLang server
(whose scheduler and detokenizer run as children in its process group), keeps two child processes alive. The
launcher with real SGLang servers and their children is exercised by `test_failed_startup_stops_everything` and every
end-to-end module.

Use: `wrapper(tmp_path)` writes an executable that runs this file, to pass as `ClusterSpec.python` or
`ares cluster up --python`.
"""

from __future__ import annotations

import stat
import subprocess
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

N_CHILDREN = 2  # SGLang's scheduler and detokenizer


def wrapper(folder: Path) -> Path:
    """An executable `python` look-alike in `folder` that runs this stand-in with whatever arguments it is given."""
    path = folder / "standin-python"
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{Path(__file__).resolve()}" "$@"\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


class _Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        code = 200 if self.path in ("/health", "/readiness") else 404
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:  # quiet
        pass


def main(argv: list[str]) -> None:
    port = int(argv[argv.index("--port") + 1])
    children = [
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"]) for _ in range(N_CHILDREN)
    ]  # same process group as this one, as SGLang's are
    try:
        ThreadingHTTPServer(("127.0.0.1", port), _Health).serve_forever()
    finally:
        for c in children:
            c.kill()


if __name__ == "__main__":
    main(sys.argv[1:])
