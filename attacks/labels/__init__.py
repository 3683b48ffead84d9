"""The labels of the reconstructed batch: inferred from the last layer's update
(:mod:`attacks.labels.inference`: the rules of :data:`LABEL_RULES` and :func:`infer_labels`),
and how an attack obtains them (:mod:`attacks.labels.plans`: granted, inferred or optimised)."""

from attacks.labels.inference import (
    LABEL_RULES,
    auto_rule,
    batch_labels,
    has_batchnorm_buffers,
    idlg_label,
    infer_labels,
    last_layer_of,
    last_layer_update,
    round_counts,
)

__all__ = [
    "LABEL_RULES",
    "auto_rule",
    "batch_labels",
    "has_batchnorm_buffers",
    "idlg_label",
    "infer_labels",
    "last_layer_of",
    "last_layer_update",
    "round_counts",
]
