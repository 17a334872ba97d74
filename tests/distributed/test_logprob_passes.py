"""Old-policy and reference log-prob passes reuse the training model code, bit for bit; epochs
over a step's batch reuse those old log-probs and advantages."""


def test_forward_only_pass_equals_the_model_forward(logprob_pass_results):
    assert logprob_pass_results["pass_equals_direct"]


def test_host_reference_weights_give_the_base_logprobs_after_an_update(logprob_pass_results):
    assert logprob_pass_results["update_changed"]       # the update moved the policy...
    assert logprob_pass_results["ref_equals_base"]      # ...the swapped-in snapshot did not
    assert logprob_pass_results["restored"]             # and the trained weights came back


def test_epochs_over_the_batch_equal_the_same_updates_made_by_hand(epoch_pass_results):
    r = epoch_pass_results
    assert r["shuffled"]                     # the second epoch visits the batch in a new order
    assert r["equal_to_hand"]                # bit for bit: same order, same fixed old log-probs
    assert r["differs_from_one_epoch"]
    assert r["updates"] == 4.0
    assert r["mean_is_mean_of_epochs"]
    assert "train/epoch1/loss" in r["epoch_keys"] and "train/epoch2/grad_norm" in r["epoch_keys"]
