"""Routing replay: routes recorded in the old-policy pass are the ones used after the weights move."""


def test_training_and_later_passes_use_the_recorded_routes(replay_results):
    assert replay_results["layers"] == 2
    assert replay_results["train_used_recorded"]
    assert replay_results["replay_used_recorded"]


def test_without_replay_the_moved_weights_route_tokens_elsewhere(replay_results):
    # what replay prevents: the same tokens, other experts (so the test above can fail)
    assert replay_results["free_routes_moved"] and replay_results["moved_tokens"] > 0
