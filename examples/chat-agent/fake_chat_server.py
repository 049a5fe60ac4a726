"""A small stand-in for an OpenAI-compatible chat endpoint, to try the example agent (and
test it) without a model or an API key. Standard library only.

    python3 examples/chat-agent/fake_chat_server.py --port 8089 --key demo-key

It answers ``POST /v1/chat/completions`` with two scripted turns (a program, then its
README, then ``done``), checks the bearer key (401 otherwise), and serves HTTPS when given
``--tls-cert``/``--tls-key``. Each answer's turn is the number of assistant messages the
request already carries, so a resumed agent gets the turn it is at.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import ssl
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TURNS: list[dict[str, Any]] = [
    {"files": {"fib.py": "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n"
                         "        a, b = b, a + b\n    return a\n\n\nprint(fib(10))\n"},
     "done": False, "summary": "wrote fib.py"},
    {"files": {"README.md": "# fib\n\n`python3 fib.py` prints the 10th Fibonacci number.\n"},
     "done": True, "summary": "documented it"},
]


class Handler(BaseHTTPRequestHandler):
    server_version = "fake-chat/1"
    key = ""

    def do_POST(self) -> None:
        if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            return self._answer(404, {"error": {"message": f"no route {self.path}"}})
        if self.headers.get("Authorization") != f"Bearer {self.key}":
            return self._answer(401, {"error": {"message": "invalid API key"}})
        length = int(self.headers.get("Content-Length") or 0)
        try:
            request = json.loads(self.rfile.read(length))
            messages = request["messages"]
        except (ValueError, KeyError, TypeError):
            return self._answer(400, {"error": {"message": "not a chat request"}})
        turn = sum(1 for m in messages if m.get("role") == "assistant")
        reply = TURNS[min(turn, len(TURNS) - 1)]
        self._answer(200, {
            "id": f"chatcmpl-{turn}", "object": "chat.completion",
            "model": request.get("model", "fake"),
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": json.dumps(reply)}}],
        })

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        print(f"{self.address_string()} {format % args}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8089, help="0: any free port")
    parser.add_argument("--key", default="demo-key", help="the API key it accepts")
    parser.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM)")
    parser.add_argument("--tls-key", help="... and this private key (PEM)")
    args = parser.parse_args(argv)
    Handler.key = args.key
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    scheme = "http"
    if args.tls_cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.tls_cert, args.tls_key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    print(f"fake chat endpoint on {scheme}://{args.host}:{server.server_port}/v1", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
