"""The reference JSON reward service (``megatron_rl.rewards.service``) that dies, like a killed
process, right after answering its ``--answers``-th batch: the e2e tests' service going down
mid-run at a known point, with no clock involved.

  python tests/e2e/flaky_reward_service.py --reward word_match --port P --answers 2
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_rl.rewards import bind
from megatron_rl.rewards.service import make_server


def main() -> None:
    """Serve ``--reward`` on ``--port``; exit the process after ``--answers`` batches."""
    p = argparse.ArgumentParser()
    p.add_argument("--reward", default="word_match")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--answers", type=int, required=True)
    args = p.parse_args()
    server = make_server(bind(args.reward), port=args.port)
    handler = server.RequestHandlerClass
    answered = {"n": 0}

    def do_post(self) -> None:
        """Answer, then die once the budget of answers is spent (no clean shutdown)."""
        handler.do_POST_orig(self)
        self.wfile.flush()
        answered["n"] += 1
        if answered["n"] >= args.answers:
            os._exit(0)

    handler.do_POST_orig, handler.do_POST = handler.do_POST, do_post
    print(f"serving on {args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
