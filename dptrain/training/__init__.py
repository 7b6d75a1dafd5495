"""Training recipes (centralized, federated) over the step loop they share, and data parallelism across processes."""
