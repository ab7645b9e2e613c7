"""What the census measures: its rows (conditions) and how many models each level samples."""

from __future__ import annotations

#: Models sampled per row at each level (``python -m experiments.census [--quick|--smoke]``).
SAMPLES = {"full": 40, "quick": 8, "smoke": 2}

#: Agreement threshold: modular "agrees" with exact when ``‖m − e‖ / ‖e‖ ≤ AGREE``.
AGREE = 1e-6

#: One row per condition. ``builder`` names a function of ``tests/strategies.py`` called as
#: ``builder(seed, *args)``; ``kind`` is ``"theorem"`` (a theorem says modular = exact) or
#: ``"counterexample"`` (a breaking condition) or ``"measured"`` (reported as found).
CONDITIONS = (
    dict(
        name="dense_full_row_rank",
        kind="theorem",
        condition=(
            "one dense layer, invertible F_η, generic batch with rank [X 1] = N "
            "(J of full row rank)"
        ),
        statement="single-map identity F_θ⁺g = J⁺F_η⁻¹g_η",
        builder=("exact_prone_case", "dense"),
        granularity="layer",
        test="test_properties.py::test_rank_report_exact_verdicts_occur[dense]",
    ),
    dict(
        name="softmax_min_norm",
        kind="theorem",
        condition="one dense layer, softmax logits (singular F_η), min-norm representative",
        statement="K = JJᵀ commutes with the projector onto null(F_blk): min-norm n_η is exact",
        builder=("exact_prone_case", "softmax_dense"),
        granularity="layer",
        test="test_properties.py::test_rank_report_exact_verdicts_occur[softmax_dense]",
    ),
    dict(
        name="dense_isotropic",
        kind="theorem",
        condition="one dense layer, N·m > P, Gaussian output (F_blk = c·I)",
        statement="single-map identity, isotropic F_η: no full row rank needed",
        builder=("exact_prone_case", "dense_expanding"),
        granularity="layer",
        test="test_properties.py::test_rank_report_exact_verdicts_occur[dense_expanding]",
    ),
    dict(
        name="tanh_over_dense",
        kind="theorem",
        condition=(
            "tanh(xW), generic batch with rank X = N (x ⊗ I of full row rank), "
            "diag(tanh′) invertible"
        ),
        statement="reverse-order law (Greville 1966) along the chain",
        builder=("exact_prone_case", "tanh"),
        granularity="layer",
        test="test_properties.py::test_rank_report_exact_verdicts_occur[tanh]",
    ),
    dict(
        name="constant_outer_map",
        kind="theorem",
        condition="(xW + b)C with a constant C (Kronecker structure)",
        statement="reverse-order law (Greville 1966) along the chain",
        builder=("exact_prone_case", "linear_outer"),
        granularity="layer",
        test="test_properties.py::test_rank_report_exact_verdicts_occur[linear_outer]",
    ),
    dict(
        name="expanding",
        kind="counterexample",
        condition="expanding map: J not of full row rank (N·m > P), Poisson output",
        statement="G⁺G ≠ I: the cancellation fails",
        builder=("expanding_case",),
        granularity="layer",
        test="test_properties.py::test_breaking_condition_has_counterexample[expanding]",
    ),
    dict(
        name="rank_deficient_batch",
        kind="counterexample",
        condition=(
            "one dense layer fed by a batch with N ≤ d + 1 but rank [X 1] < N (one example "
            "the mean of two others), non-isotropic F_η"
        ),
        statement="(X Xᵀ + 11ᵀ) ⊗ I singular: J not of full row rank, the identity fails",
        builder=("rank_deficient_batch_case",),
        granularity="layer",
        test="test_theory.py::test_theorem_fails_where_the_data_rank_condition_fails",
    ),
    dict(
        name="reverse_order",
        kind="counterexample",
        condition="composition violating the reverse-order law: tanh(xW)C",
        statement="(AB)⁺ ≠ B⁺A⁺ (Greville's conditions fail)",
        builder=("reverse_order_case",),
        granularity="layer",
        test="test_properties.py::test_breaking_condition_has_counterexample[reverse_order]",
    ),
    dict(
        name="multi_layer",
        kind="counterexample",
        condition="parameters at two layers: 3→4→2 tanh MLP, batch 2",
        statement="each layer splits the step between its weights and its input",
        builder=("multi_layer_case",),
        granularity="layer",
        test="test_properties.py::test_breaking_condition_has_counterexample[multi_layer]",
    ),
    dict(
        name="singular_fisher",
        kind="counterexample",
        condition="singular F_η (softmax), representative pin_last, one dense layer",
        statement="n_η not minimum-norm in parameter space",
        builder=("singular_fisher_case", "pin_last"),
        granularity="layer",
        test="test_properties.py::test_breaking_condition_has_counterexample[singular_fisher]",
    ),
    dict(
        name="fan_out",
        kind="counterexample",
        condition="weight shared across a batch by fan-out (one use per example)",
        statement="pinv of a stack ≠ average of per-use pinvs",
        builder=("fan_out_case",),
        granularity="layer",
        test="test_properties.py::test_breaking_condition_has_counterexample[fan_out]",
    ),
    dict(
        name="saturated",
        kind="counterexample",
        condition="saturated tanh unit (pre-activation 17) for one of two examples",
        statement="local cut-off ≠ global cut-off",
        builder=("saturated_case",),
        granularity="layer",
        test="test_properties.py::test_breaking_condition_has_counterexample[saturated]",
    ),
    dict(
        name="primitive_bias",
        kind="measured",
        condition="one dense layer with bias at primitive granularity",
        statement="the add splits the step between x·W and b",
        builder=("exact_prone_case", "dense"),
        granularity="primitive",
        test="test_properties.py::test_rank_report_exact_verdict_is_sound",
    ),
    dict(
        name="generated_mlps",
        kind="measured",
        condition="generated MLPs: depth 1–4, every family and activation, weight modes",
        statement="verdict sound; agreement as measured",
        builder=("generated_case",),
        granularity="layer",
        test="test_properties.py::test_rank_report_exact_verdict_is_sound",
    ),
)
