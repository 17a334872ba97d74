"""Rewards over HTTP (rewards/http.py, rewards/service.py) against real servers on 127.0.0.1:
the JSON service's scores equal the reward run in-process, batching keeps the order, retries
recover transient errors and only those, a down service stops with one line naming the URL, an
LLM judge's reply is parsed, and a response the service could not score skips its group (never a
zero)."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from megatron_rl.config import ConfigError, load_config
from megatron_rl.data.prompts import PromptRow
from megatron_rl.rewards import bind, score
from megatron_rl.rewards.http import HttpReward, HttpSettings, Item, ServiceDown
from megatron_rl.rewards.service import make_server
from megatron_rl.rollout.collect import SamplingPlan, collect_rollouts, score_groups
from megatron_rl.rollout.engine import Sample
from megatron_rl.rollout.scoring import Scorer


class Stub:
    """A server on a free port whose answer to each POST is ``reply(n, body)`` -> (status, body,
    delay); ``n`` counts the POSTs from 0."""

    def __init__(self, reply):
        self.bodies, lock = [], threading.Lock()
        stub = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    n = len(stub.bodies)
                    stub.bodies.append(body)
                code, out, delay = reply(n, body)
                time.sleep(delay)
                data = json.dumps(out).encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def served():
    """The reference JSON service scoring ``exact_match``."""
    server = make_server(bind("exact_match"))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/score"
    server.shutdown()
    server.server_close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _items(n):
    return [Item(f"p{i}", ["42", "41", " 42 "][i % 3], "42", {"i": i}) for i in range(n)]


def _ok(n, body):
    return 200, {"scores": [float(len(it["response"])) for it in body["items"]]}, 0.0


def test_the_json_service_scores_equal_the_reward_run_in_process_in_order_over_batches(served):
    items = _items(10)
    client = HttpReward(HttpSettings(url=served, batch_size=3, concurrency=3))
    got = client.score(items)
    want = [score("exact_match", it.response, it.label, prompt=it.prompt).score for it in items]
    assert [o.score for o in got] == want and len(set(want)) > 1
    stats = client.take_stats()
    assert stats["http_calls"] == 4 and stats["http_failed_calls"] == 0   # ceil(10 / 3) POSTs
    assert client.take_stats()["http_calls"] == 0                          # reset after a take


def test_transient_errors_are_retried_and_the_scores_are_the_same():
    stub = Stub(lambda n, body: (503, {"error": "busy"}, 0.0) if n < 2 else _ok(n, body))
    try:
        client = HttpReward(HttpSettings(url=stub.url, batch_size=8, retries=3, backoff_s=0.01))
        got = client.score(_items(4))
        assert [o.score for o in got] == [2.0, 2.0, 4.0, 2.0]
        assert client.take_stats()["http_retries"] == 2 and client.consecutive == 0
    finally:
        stub.close()


def test_a_client_error_is_not_retried_and_leaves_the_items_unscored():
    stub = Stub(lambda n, body: (400, {"error": "bad field"}, 0.0))
    try:
        client = HttpReward(HttpSettings(url=stub.url, retries=3, backoff_s=0.01,
                                         max_consecutive_failures=5))
        got = client.score(_items(3))
        assert all(o.score is None and "HTTP 400" in o.error for o in got)
        assert len(stub.bodies) == 1 and client.take_stats()["http_retries"] == 0
    finally:
        stub.close()


def test_a_slow_answer_times_out_and_is_retried():
    stub = Stub(lambda n, body: (200, _ok(n, body)[1], 2.0 if n == 0 else 0.0))
    try:
        client = HttpReward(HttpSettings(url=stub.url, timeout_s=0.5, retries=1, backoff_s=0.0))
        assert [o.score for o in client.score(_items(2))] == [2.0, 2.0]
        assert len(stub.bodies) == 2
    finally:
        stub.close()


def test_a_down_service_raises_one_line_naming_the_url_after_the_consecutive_failures():
    url = f"http://127.0.0.1:{_free_port()}/score"
    client = HttpReward(HttpSettings(url=url, batch_size=1, concurrency=1, retries=1,
                                     backoff_s=0.0, max_consecutive_failures=3))
    with pytest.raises(ServiceDown) as e:
        client.score(_items(5))
    msg = str(e.value)
    assert url in msg and "3 call(s) in a row" in msg and "\n" not in msg
    stats = client.take_stats()
    assert stats["http_failed_calls"] == 3      # the last two items were not sent
    # below the limit: the items are unscored, nothing raised
    client = HttpReward(HttpSettings(url=url, batch_size=8, retries=0, max_consecutive_failures=2))
    assert all(o.score is None for o in client.score(_items(3)))


def test_on_failure_stop_stops_at_the_first_failed_call():
    stub = Stub(lambda n, body: (500, {}, 0.0) if n == 1 else _ok(n, body))
    try:
        client = HttpReward(HttpSettings(url=stub.url, batch_size=2, concurrency=1, retries=0,
                                         on_failure="stop", max_consecutive_failures=10))
        with pytest.raises(ServiceDown):
            client.score(_items(6))
    finally:
        stub.close()


def test_a_malformed_answer_fails_the_call_and_a_non_number_leaves_its_item_unscored():
    stub = Stub(lambda n, body: (200, {"scores": [1.0]} if n == 0 else
                                 {"scores": [1.0, None, "x", {"score": 0.5}]}, 0.0))
    try:
        client = HttpReward(HttpSettings(url=stub.url, batch_size=4, concurrency=1, retries=2,
                                         max_consecutive_failures=5))
        first = client.score(_items(4))
        assert all(o.score is None and "expected" in o.error for o in first)
        assert len(stub.bodies) == 1                       # a wrong shape is not retried
        assert [o.score for o in client.score(_items(4))] == [1.0, None, None, 0.5]
    finally:
        stub.close()


def _chat(n, body):
    text = body["messages"][-1]["content"]
    verdict = "7" if "Response:\n42" in text else "no idea"
    return 200, {"choices": [{"message": {"role": "assistant", "content": f"Score: {verdict}"}}]}, 0.0


def test_an_openai_judge_is_sent_the_filled_template_and_its_number_is_parsed_and_scaled():
    stub = Stub(_chat)
    try:
        s = HttpSettings(url=stub.url + "/v1", protocol="openai", model="judge",
                         prompt_template="Q: {prompt}\nResponse:\n{response}\nRef: {label}",
                         system_prompt="be fair", score_scale=0.1, concurrency=2,
                         extra_body={"structured_outputs": {"choice": ["1", "7"]}})
        got = HttpReward(s).score([Item("p", "42", "42"), Item("p", "41", "42")])
        assert got[0].score == pytest.approx(0.7)
        assert got[1].score is None and "no score" in got[1].error
        body = stub.bodies[0]
        assert body["model"] == "judge" and body["temperature"] == 0.0
        assert body["messages"][0] == {"role": "system", "content": "be fair"}
        assert body["structured_outputs"] == {"choice": ["1", "7"]}
        assert {b["messages"][1]["content"] for b in stub.bodies} == {
            "Q: p\nResponse:\n42\nRef: 42", "Q: p\nResponse:\n41\nRef: 42"}
    finally:
        stub.close()


def _groups(rows, texts):
    """Samples whose tokens decode (``chr``) to ``texts`` per row."""
    return [[Sample(r.index, [1, 2], [ord(c) for c in t], [-1.0] * len(t), "stop") for t in ts]
            for r, ts in zip(rows, texts)]


def _scorer(url, **reward):
    cfg = load_config("tiny_moe_gspo", [f"reward.http.url={url}", "reward.http.retries=0",
                                        *[f"reward.{k}={v}" for k, v in reward.items()]])
    sc = Scorer.of(cfg.reward, None)
    return Scorer(sc.name, sc.params, lambda ids: "".join(map(chr, ids)), sc.failure_score,
                  sc.workers, sc.components, sc.service)


def test_a_group_with_an_unscored_response_is_skipped_never_zeroed():
    # the service leaves every response "bad" unscored
    stub = Stub(lambda n, body: (200, {"scores": [None if it["response"] == "bad" else 1.0
                                                  for it in body["items"]]}, 0.0))
    try:
        scorer = _scorer(stub.url, name="http", **{"http.max_consecutive_failures": 2})
        rows = [PromptRow(i, f"p{i}", "42") for i in range(3)]
        groups = _groups(rows, [["ok", "ok"], ["ok", "bad"], ["ok", "ok"]])
        scores, failures, error, _ = score_groups(scorer, rows, groups)
        assert scores == [[1.0, 1.0], [1.0, None], [1.0, 1.0]] and failures == 1
        draw = lambda k: [(r, [1, 2]) for r in rows[:k]]   # noqa: E731
        out = collect_rollouts(draw, lambda drawn: (groups, scores, failures, error, {},
                                                    scorer.service.take_stats(), ""),
                               SamplingPlan(groups_needed=3, n=2, max_tokens=4))
        assert [r.index for r in out.rows] == [0, 2] and out.skipped_groups == 1
        m = out.metrics()
        assert m["reward/groups_skipped"] == 1.0 and m["reward/mean"] == 1.0   # no zero in it
        assert m["reward/http_calls"] == 1.0
    finally:
        stub.close()


def test_a_service_component_is_summed_with_rule_rewards_by_weight(served):
    comps = ("[{name: http, weight: 2.0}, {name: format, weight: 0.5, "
             "params: {pattern: '^4'}}]")
    scorer = _scorer(served, components=comps)
    rows = [PromptRow(0, "p", "42")]
    scores, failures, _, parts = score_groups(scorer, rows, _groups(rows, [["42", "41", "x"]]))
    fmt = [score("format", t, "42", pattern="^4").score for t in ("42", "41", "x")]
    assert scores == [[2.0 * m + 0.5 * f for m, f in zip([1.0, 0.0, 0.0], fmt)]]
    assert parts["http"] == 1.0 and failures == 0


def test_a_fatal_round_ends_the_collection_and_is_kept_for_the_trainer():
    rows = [PromptRow(i, f"p{i}", "1") for i in range(4)]
    draw = lambda k: [(r, [1]) for r in rows[:k]]   # noqa: E731
    out = collect_rollouts(draw, lambda d: ([[]] * len(d), [None] * len(d), 0, "", {}, {},
                                            "reward.http: down"),
                           SamplingPlan(groups_needed=4, n=2, max_tokens=4, dynamic=True,
                                        max_rounds=5))
    assert out.fatal == "reward.http: down" and out.rounds == 1 and not out.rows


@pytest.mark.parametrize("override, key", [
    (["reward.name=http", "reward.http.url=localhost:8000"], "reward.http.url"),
    (["reward.name=http", "reward.http.url=http://h/v1", "reward.http.protocol=openai"],
     "reward.http.model"),
    (["reward.name=http", "reward.http.url=http://h/v1", "reward.http.protocol=openai",
      "reward.http.model=j", "reward.http.prompt_template='{answer}'"], "reward.http.prompt_template"),
    (["reward.name=http", "reward.http.url=http://h/v1", "reward.http.protocol=openai",
      "reward.http.model=j", "reward.http.score_regex='('"], "reward.http.score_regex"),
    (["reward.name=http", "reward.http.url=http://h", "reward.params={x: 1}"], "reward.params"),
    (["reward.name=http", "reward.http.url=http://h", "reward.http.on_failure=zero"],
     "reward.http.on_failure"),
    (["reward.name=http", "reward.http.url=http://h", "reward.http.api_key_env=NO_SUCH_VAR_X"],
     "reward.http.api_key_env"),
    (["reward.components=[{name: http}, {name: http}]", "reward.http.url=http://h"],
     "reward.components"),
    (["env.name=lookup", "reward.name=http", "reward.http.url=http://h"], "reward.name"),
])
def test_a_reward_service_config_that_cannot_work_is_one_line_naming_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config("tiny_moe_gspo", override)
    assert str(e.value).startswith(key) and "\n" not in str(e.value)
