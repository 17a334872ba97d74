"""Old-policy and reference log-prob passes reuse the training model code, bit for bit."""


def test_forward_only_pass_equals_the_model_forward(logprob_pass_results):
    assert logprob_pass_results["pass_equals_direct"]


def test_host_reference_weights_give_the_base_logprobs_after_an_update(logprob_pass_results):
    assert logprob_pass_results["update_changed"]       # the update moved the policy...
    assert logprob_pass_results["ref_equals_base"]      # ...the swapped-in snapshot did not
    assert logprob_pass_results["restored"]             # and the trained weights came back
