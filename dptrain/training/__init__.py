"""Training recipes (centralized; federated and distributed later) and the step loop they share."""
