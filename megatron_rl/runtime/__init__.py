"""Foundations below ``checkpoint/`` and ``train/``, which both use them: Megatron's parallel state
(``parallel_init``), building the model (``model_setup``), the crash points the tests kill at
(``crash_points``), the output directory's run lock (``run_lock``) and preemption signals
(``preempt``)."""
