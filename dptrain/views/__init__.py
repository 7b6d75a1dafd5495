"""What a person sees of a run: the console summary at the end of ``dptrain train`` and the audit's
TensorBoard panels, rendered from the run's typed metrics and audit report."""
