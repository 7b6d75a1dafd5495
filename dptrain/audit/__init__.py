"""Privacy audits of a trained model, as pure computations on arrays.

``metrics`` turns attack scores into ROC, AUC, TPR at low FPR, advantage and
empirical epsilon lower bounds; ``membership`` scores records with LOSS, LiRA
and RMIA; ``attribute`` runs attribute inference against an imputation
baseline; ``canary`` computes the one-run (canary) epsilon lower bound, ``fdp`` its f-DP
counterpart against a family of trade-off curves. ``results`` holds what they return, the
audit's result types, and ``audit.json`` as their ``to_dict`` / ``AuditReport.from_dict``.
"""
