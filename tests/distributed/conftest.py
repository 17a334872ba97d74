import pytest

from tests.distributed import workers
from tests.distributed.harness import spawn


@pytest.fixture(scope="session")
def loss_results():
    """One 8-process spawn runs every loss-equivalence check; tests read their figures."""
    return spawn(workers.loss_equivalence, 8)


@pytest.fixture(scope="session")
def convention_results():
    return spawn(workers.conventions, 4)


MODEL_CASES_2 = [
    # name, layout, micro-batches per DP rank, loss[, batching]
    ("tp2", {"tp": 2}, 1, "gspo"),
    ("ep2", {"ep": 2}, 1, "gspo"),
    ("pp2", {"pp": 2}, 2, "gspo"),
    ("tp2_ep2_etp1", {"tp": 2, "ep": 2, "etp": 1}, 1, "future_kl_grpo"),
    ("dp2_mb1", {}, 1, "gspo"),
    ("dp2_mb4", {}, 4, "gspo"),
    ("dp2_mb1_fkl", {}, 1, "future_kl_grpo"),
    ("dp2_mb4_fkl", {}, 4, "future_kl_grpo"),
    # through train.batches: sequences cut to their length, padded (BSHD) or packed (THD)
    ("builder_bshd_tp2", {"tp": 2}, 1, "gspo", "bshd"),
    ("builder_thd_dp2_mb2", {}, 2, "future_kl_grpo", "thd"),
    ("builder_thd_pp2", {"pp": 2}, 2, "gspo", "thd"),
]
# MoE auxiliary losses (load balancing + z-loss) under the same contract: Megatron averages them over
# the step's micro-batches and DP ranks; the reference runs the same partition (model_workers)
AUX = {"router_aux_loss_coef": 0.05, "router_z_loss_coef": 0.01}
MODEL_CASES_AUX = [
    ("aux_dp2_mb2", {}, 2, "gspo", "manual", AUX),
    ("aux_tp2_mb2", {"tp": 2}, 2, "gspo", "manual", AUX),
    ("aux_ep2_mb1", {"ep": 2}, 1, "future_kl_grpo", "manual", AUX),
    ("aux_pp2_mb2", {"pp": 2}, 2, "gspo", "manual", AUX),
]
MODEL_CASES_4 = [
    ("tp2_ep2", {"tp": 2, "ep": 2}, 1, "gspo"),
    ("tp2_pp2", {"tp": 2, "pp": 2}, 2, "future_kl_grpo"),
    ("ep2_pp2_dp2", {"ep": 2, "pp": 2}, 2, "gspo"),
]


# DeepSeek-V3-style: multi-latent attention, a shared expert, sigmoid router with expert bias
# (TP with MLA needs TransformerEngine: refused on CPU, see test_hf_config)
MODEL_CASES_DEEPSEEK = [
    ("deepseek_ep2", {"ep": 2}, 1, "future_kl_grpo"),
    ("deepseek_pp2", {"pp": 2}, 2, "gspo"),
    ("deepseek_dp2_mb2", {}, 2, "gspo", "thd"),
]


def _model_spawns(tmp_path_factory, runs) -> dict:
    """``runs``: (world, cases, model, HF overrides); one spawn each, every case's figures."""
    from tests.distributed import model_workers

    out = {}
    for i, (world, cases, model, overrides) in enumerate(runs):
        out.update(spawn(model_workers.model_equivalence, world,
                         str(tmp_path_factory.mktemp(f"{model}_{i}")), cases, model, overrides))
    return out


@pytest.fixture(scope="session")
def model_results(tmp_path_factory):
    """Three spawns (2, 4 and 2 gloo processes) run every Megatron model layout."""
    return _model_spawns(tmp_path_factory, [(2, MODEL_CASES_2 + MODEL_CASES_AUX, "qwen3_moe", None),
                                            (4, MODEL_CASES_4, "qwen3_moe", None),
                                            (2, MODEL_CASES_DEEPSEEK, "deepseek_v3", None)])


# EP 2 has two chained optimizers (dense and expert parameters): each restores its own Adam step
RESUME_LAYOUTS = {"tp2": {"tp": 2}, "dp2": {}, "ep2": {"ep": 2}, "pp2": {"pp": 2}, "cp2": {"cp": 2}}


@pytest.fixture(scope="session")
def resume_results(tmp_path_factory):
    from tests.distributed import ckpt_workers

    return {name: spawn(ckpt_workers.resume, 2, str(tmp_path_factory.mktemp(name)), kw)
            for name, kw in RESUME_LAYOUTS.items()}


# optimizer state across a layout change (train.optimizer_checkpoint): name, saved, loaded, format
RESHARD_CASES = [
    ("tp2_to_dp2", {"tp": 2}, {}, "fully_reshardable"),
    ("dp2_to_tp2", {}, {"tp": 2}, "fully_reshardable"),
    ("pp2_to_dp2", {"pp": 2}, {}, "fully_reshardable"),
    ("cp2_to_dp2", {"cp": 2}, {}, "fully_reshardable"),
    ("ep2_same_layout", {"ep": 2}, {"ep": 2}, "fully_reshardable"),
    ("ep2_to_dp2", {"ep": 2}, {}, "fully_reshardable"),       # refused: EP changes the optimizer
    ("dp_reshardable_cp2_to_dp2", {"cp": 2}, {}, "dp_reshardable"),   # the same DP x CP shards
    ("dp_reshardable_tp2_to_dp2", {"tp": 2}, {}, "dp_reshardable"),   # refused: TP changed
    # what the test must tell apart: the weights alone with a fresh optimizer
    ("tp2_to_dp2_weights_only", {"tp": 2}, {}, "fully_reshardable"),
]


@pytest.fixture(scope="session")
def reshard_results(tmp_path_factory):
    from tests.distributed import ckpt_workers

    return spawn(ckpt_workers.reshard, 2, str(tmp_path_factory.mktemp("reshard")), RESHARD_CASES)


@pytest.fixture(scope="session")
def dp_world_results(tmp_path_factory):
    """Saved by 2 ranks (DP 2), resumed by 1 (DP 1), in each optimizer format."""
    from tests.distributed import ckpt_workers

    out = {}
    for fmt in ("dp_reshardable", "fully_reshardable"):
        d = str(tmp_path_factory.mktemp(fmt))
        out[fmt] = {"straight": spawn(ckpt_workers.dp_world_save, 2, d, fmt),
                    "resumed": spawn(ckpt_workers.dp_world_load, 1, d)}
    return out


@pytest.fixture(scope="session")
def hygiene_results(tmp_path_factory):
    from tests.distributed import ckpt_workers

    return spawn(ckpt_workers.hygiene, 1, str(tmp_path_factory.mktemp("hyg")))


@pytest.fixture(scope="session")
def patch_results():
    from tests.distributed import patch_workers

    out = {}
    for world in sorted(patch_workers.NEEDS):
        # spawned, as a real run starts: in a forked child torch's CUDA build answers a CUDA call
        # with "Cannot re-initialize CUDA in forked subprocess", not upstream's no-CUDA error
        out.update(spawn(patch_workers.still_needed, world, start_method="spawn"))
    return out


@pytest.fixture(scope="session")
def epoch_pass_results():
    from tests.distributed import model_workers

    return spawn(model_workers.epoch_passes, 1)


@pytest.fixture(scope="session")
def logprob_pass_results():
    from tests.distributed import model_workers

    return spawn(model_workers.logprob_passes, 1)


@pytest.fixture(scope="session")
def replay_results():
    from tests.distributed import model_workers

    return spawn(model_workers.routing_replay, 1)


@pytest.fixture(scope="session")
def integrity_results(tmp_path_factory):
    from tests.distributed import ckpt_workers

    return spawn(ckpt_workers.integrity, 1, str(tmp_path_factory.mktemp("integrity")))


@pytest.fixture(scope="session")
def latest_damage_results(tmp_path_factory):
    from tests.distributed import ckpt_workers

    return spawn(ckpt_workers.latest_damage, 1, str(tmp_path_factory.mktemp("latest")))


@pytest.fixture(scope="session")
def nonfinite_results(tmp_path_factory):
    from tests.distributed import ckpt_workers

    return spawn(ckpt_workers.nonfinite_updates, 2, str(tmp_path_factory.mktemp("nan")))


@pytest.fixture(scope="session")
def ckpt_dir_fuzz_results(tmp_path_factory):
    from tests.distributed import ckpt_workers

    return spawn(ckpt_workers.checkpoint_dir_fuzz, 1, str(tmp_path_factory.mktemp("ckfuzz")))


@pytest.fixture(scope="session")
def cp_attention_results():
    """The CP attention alone at CP 2 and 4 (and its two mutants), one 4-process spawn."""
    from tests.distributed import cp_workers

    return spawn(cp_workers.cp_attention_equivalence, 4)


# Context parallelism through the real model: the batch builder shards every sequence over CP
# (bshd; thd ragged; thd_aligned = the group-aligned lengths the trainer packs for future-KL)
FKL = "future_kl_grpo"
MODEL_CASES_CP_2 = [
    ("cp2_bshd_gspo", {"cp": 2}, 1, "gspo", "bshd"),
    ("cp2_thd_gspo", {"cp": 2}, 2, "gspo", "thd"),
    ("cp2_bshd_fkl", {"cp": 2}, 2, FKL, "bshd"),
    ("cp2_thd_fkl_ragged", {"cp": 2}, 2, FKL, "thd"),
    ("cp2_thd_fkl_aligned", {"cp": 2}, 1, FKL, "thd_aligned"),
    ("cp2_ep2_bshd_gspo", {"cp": 2, "ep": 2}, 1, "gspo", "bshd"),
    ("cp2_ep2_thd_fkl", {"cp": 2, "ep": 2}, 1, FKL, "thd"),
]
# the loss-scaling contract broken on purpose: our adapter multiplies by the CP size that
# Megatron's schedule already applies (model_workers._mutation); the gradients must double
MODEL_CASES_CP_MUTANT = [
    ("mutant_cp_factor_twice", {"cp": 2}, 1, "gspo", "bshd", {}, {"mutation": "cp_factor_twice"}),
]
MODEL_CASES_CP_4 = [
    ("cp4_bshd_gspo", {"cp": 4}, 1, "gspo", "bshd"),
    ("cp4_thd_gspo", {"cp": 4}, 2, "gspo", "thd"),
    ("cp4_bshd_fkl", {"cp": 4}, 1, FKL, "bshd"),
    ("cp4_thd_fkl_aligned", {"cp": 4}, 2, FKL, "thd_aligned"),
    # responses of 1-2 tokens: CP ranks 0-2 hold no response token (they still join every
    # collective and contribute gradient through the attention's K/V)
    ("cp4_thd_fkl_short", {"cp": 4}, 1, FKL, "thd", {}, {"responses": "short"}),
    ("cp4_bshd_gspo_short", {"cp": 4}, 1, "gspo", "bshd", {}, {"responses": "short"}),
    ("cp2_tp2_bshd_gspo", {"cp": 2, "tp": 2}, 1, "gspo", "bshd"),
    ("cp2_tp2_thd_fkl", {"cp": 2, "tp": 2}, 1, FKL, "thd"),
    ("cp2_pp2_bshd_fkl", {"cp": 2, "pp": 2}, 2, FKL, "bshd"),
    ("cp2_pp2_thd_gspo", {"cp": 2, "pp": 2}, 2, "gspo", "thd"),
    ("cp2_dp2_bshd_fkl", {"cp": 2}, 1, FKL, "bshd"),       # world 4 / CP 2 = DP 2
    ("cp2_dp2_thd_gspo", {"cp": 2}, 2, "gspo", "thd"),
]
MODEL_CASES_CP_OTHER = {
    # (model, HF overrides, world): cases
    ("deepseek_v3", None, 2): [("deepseek_cp2_bshd_fkl", {"cp": 2}, 1, FKL, "bshd"),
                               ("deepseek_cp2_thd_gspo", {"cp": 2}, 2, "gspo", "thd")],
    # YaRN RoPE (the released DeepSeek-V3's), scaling past 8 positions of the 16
    ("deepseek_v3", "yarn", 2): [("deepseek_yarn_cp2_thd_fkl", {"cp": 2}, 1, FKL, "thd")],
    ("mixtral", None, 2): [("mixtral_cp2_bshd_fkl", {"cp": 2}, 1, FKL, "bshd"),
                           ("mixtral_cp2_thd_gspo", {"cp": 2}, 2, "gspo", "thd")],
    # sequence parallelism splits each rank's share over TP: the builder pads every sequence to a
    # multiple of 2 x CP x TP (a multiple of 2 x CP failed Megatron's divisibility check at TP 4)
    ("qwen3_moe", "kv4", 4): [("tp4_thd_gspo", {"tp": 4}, 1, "gspo", "thd"),
                              ("tp4_bshd_fkl", {"tp": 4}, 2, FKL, "bshd")],
}
OVERRIDES = {
    "yarn": {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8,
                              "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}},
    "kv4": {"num_key_value_heads": 4},   # TP 4 must divide the K/V heads
}


@pytest.fixture(scope="session")
def cp_model_results(tmp_path_factory):
    runs = [(2, MODEL_CASES_CP_2 + MODEL_CASES_CP_MUTANT, "qwen3_moe", None),
            (4, MODEL_CASES_CP_4, "qwen3_moe", None)]
    runs += [(world, cases, model, OVERRIDES.get(overrides))
             for (model, overrides, world), cases in MODEL_CASES_CP_OTHER.items()]
    return _model_spawns(tmp_path_factory, runs)


# Routing replay of the engine's routes (R3): name, layout, micro-batches per DP rank, loss,
# packed (THD), mutation. The two mutants (no replay; routes one token late) must fail.
ROUTE_CASES = [
    ("r3_tp2_bshd", {"tp": 2}, 1, "gspo", False, None),
    ("r3_ep2_bshd", {"ep": 2}, 1, "gspo", False, None),
    ("r3_pp2_thd", {"pp": 2}, 2, "future_kl_grpo", True, None),
    ("r3_cp2_bshd", {"cp": 2}, 1, "gspo", False, None),
    ("r3_cp2_thd", {"cp": 2}, 2, "future_kl_grpo", True, None),
    ("r3_dp2_bshd_mb2", {}, 2, "gspo", False, None),
    ("mutant_r3_no_replay", {"tp": 2}, 1, "gspo", False, "drop"),
    ("mutant_r3_shifted", {"cp": 2}, 1, "gspo", True, "shift"),
]


@pytest.fixture(scope="session")
def route_results(tmp_path_factory):
    from tests.distributed import route_workers

    return spawn(route_workers.route_equivalence, 2, str(tmp_path_factory.mktemp("r3")), ROUTE_CASES)


@pytest.fixture(scope="session")
def route_check_results():
    from tests.distributed import route_workers

    return {model: spawn(route_workers.route_checks, 1, model)
            for model in ("qwen3_moe", "deepseek_v3", "mixtral")}
