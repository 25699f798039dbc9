"""A (switchable) hostile rank-0 metrics endpoint, run as its own process (`python -m tests.support.hostile_metrics
KIND PORT_FILE`) so that streaming 100 MiB never competes with the test's own event loop.

KIND `huge`: every GET of /metrics streams 100 MiB of valid exposition lines with no
Content-Length (close-delimited), so only a streaming cap can refuse it. KIND `inf`: gauges
of +Inf/-Inf next to finite ones. It starts honest (finite gauges, like a trainer) until GET /arm
switches it to KIND; GET /sent answers the bytes written to /metrics so far.
"""

from __future__ import annotations

import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HUGE = 100 * 2**20
OK_BODY = 'kubedpo_step{rank="0"} 50\nkubedpo_total_steps{rank="0"} 100\nkubedpo_loss{rank="0"} 0.6\n'
INF_BODY = ('kubedpo_step{rank="0"} 50\nkubedpo_total_steps{rank="0"} 100\nkubedpo_loss{rank="0"} +Inf\n'
            'kubedpo_eta_seconds{rank="0"} +Inf\nkubedpo_job_tokens_per_second{rank="0"} -Inf\n'
            'kubedpo_rewards_accuracies{rank="0"} 0.5\n')
LINE = b'kubedpo_junk{rank="0",i="0123456789"} 1\n'


def main(kind: str, port_file: str) -> None:
    sent, armed = [0], [False]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            if self.path == "/sent":
                self.wfile.write(str(sent[0]).encode())
            elif self.path == "/arm":
                armed[0] = True
            elif not armed[0]:
                self.wfile.write(OK_BODY.encode())
            elif kind == "inf":
                self.wfile.write(INF_BODY.encode())
            else:
                chunk = LINE * (65536 // len(LINE))
                try:
                    for _ in range(HUGE // len(chunk) + 1):
                        self.wfile.write(chunk)
                        sent[0] += len(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    return

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    Path(port_file).write_text(str(server.server_address[1]))
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
