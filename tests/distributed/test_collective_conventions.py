"""The adjoint rule, shown both ways: the right backward gives the single-process gradient, the
wrong one gives the classic bug (so these tests would catch either mistake in the loss path)."""


def test_tp_replicated_loss_needs_identity_backward(convention_results):
    assert convention_results["tp_replicated"]["err"] < 1e-12
    assert abs(convention_results["tp_replicated"]["ratio"] - 1) < 1e-12


def test_summed_backward_on_tp_replicated_loss_multiplies_grads_by_tp(convention_results):
    # the bug a summed-backward all-reduce causes under TP=2: every gradient exactly doubled
    assert abs(convention_results["tp_partial"]["ratio"] - 2) < 1e-12


def test_cp_partial_loss_needs_summed_backward(convention_results):
    # gradients through the GSPO sequence ratio and the future-only ratio across CP=2 shards
    assert convention_results["cp_partial"]["err"] < 1e-12


def test_identity_backward_on_cp_partial_loss_drops_terms(convention_results):
    assert convention_results["cp_replicated"]["err"] > 1e-2
