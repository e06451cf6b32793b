"""Evaluation-time measures of modality imbalance, on the user's model.

- :func:`shapley`: exact Shapley contributions of each modality to accuracy and to loss over
  a data loader, from masked forwards (zero or mean-feature masking; optionally per sample).
- :func:`probe_accuracy` / :func:`linear_probe`: linear-probe accuracy of each frozen encoder
  (a fixed, seeded L-BFGS logistic-regression recipe).
- :func:`report`: both in one table (text, Markdown) and one figure.

See docs/diagnostics.md. matplotlib is imported only when a figure is drawn.
"""
from .masking import MASKINGS, ModalityMask
from .probe import encoder_features, linear_probe, probe_accuracy
from .report import ImbalanceReport, report
from .shapley import MAX_MODALITIES, ShapleyResult, coalitions, shapley, shapley_matrix

__all__ = ["shapley", "ShapleyResult", "ModalityMask", "MASKINGS", "MAX_MODALITIES",
           "coalitions", "shapley_matrix", "linear_probe", "probe_accuracy",
           "encoder_features", "report", "ImbalanceReport"]
