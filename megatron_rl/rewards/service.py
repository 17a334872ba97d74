"""A JSON reward service (the ``reward.http`` protocol ``json``) serving any registered or user
reward, on the standard library's threading HTTP server. It is the protocol's reference: a user's
own service in any language answers the same way.

  python -m megatron_rl.rewards.service --reward exact_match --port 8123
  python -m megatron_rl.rewards.service --reward my_rewards.py:score --param scale=2

``POST /`` (any path) with ``{"items": [{"prompt", "response", "label", "metadata"}, ...]}``
answers ``{"scores": [...]}``; a reward that raises scores ``null`` for that item (the trainer
skips its group). ``GET /health`` answers ``{"ok": true}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, List, Optional

from megatron_rl.rewards import bind, run
from megatron_rl.rewards.user import is_user_reward, register_user_reward


def score_items(fn: Callable, items: List[Dict[str, Any]]) -> List[Optional[float]]:
    """Each item scored by the bound reward ``fn`` (None where it raised or was not finite)."""
    out = []
    for it in items:
        prompt = it.get("prompt", "")
        r = run(fn, str(it.get("response", "")), it.get("label"),
                prompt=prompt if isinstance(prompt, str) else str(prompt),
                metadata=it.get("metadata") or {})
        out.append(None if r.error is not None else r.score)
    return out


def make_server(fn: Callable, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """A server scoring with ``fn`` (port 0: a free one, read back from ``server_address``)."""

    class Handler(BaseHTTPRequestHandler):
        """One request: a batch scored, or the health check."""

        def _answer(self, code: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 -- the http.server hook's name
            """``/health``."""
            self._answer(200, {"ok": True})

        def do_POST(self) -> None:  # noqa: N802
            """A batch: ``{"items": [...]}`` -> ``{"scores": [...]}``."""
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                items = body["items"]
                if not isinstance(items, list):
                    raise TypeError("items is not a list")
            except (ValueError, KeyError, TypeError) as e:
                self._answer(400, {"error": f"expected {{\"items\": [...]}}: {e}"})
                return
            self._answer(200, {"scores": score_items(fn, items)})

        def log_message(self, *args) -> None:
            """Quiet: one line per request would drown the trainer's console."""

    return ThreadingHTTPServer((host, port), Handler)


def main(argv: Optional[List[str]] = None) -> int:
    """Serve ``--reward`` until interrupted."""
    p = argparse.ArgumentParser(prog="python -m megatron_rl.rewards.service", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reward", default="exact_match",
                   help="a built-in reward, path/to/file.py:fn or package.module:fn")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a keyword argument of the reward (a JSON value, or a string)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8123)
    args = p.parse_args(argv)
    params = {}
    for kv in args.param:
        key, sep, value = kv.partition("=")
        if not sep:
            p.error(f"--param {kv!r}: expected KEY=VALUE")
        try:
            params[key] = json.loads(value)
        except ValueError:
            params[key] = value
    try:
        if is_user_reward(args.reward):
            register_user_reward(args.reward)
        fn = bind(args.reward, **params)
    except (KeyError, ValueError, TypeError) as e:
        print(f"reward service: --reward/--param: {e}", file=sys.stderr)
        return 2
    server = make_server(fn, args.host, args.port)
    host, port = server.server_address[:2]
    print(f"reward service: {args.reward} on http://{host}:{port}/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
