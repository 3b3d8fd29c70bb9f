"""Knative floor: object builders, the Kubernetes client and the Knative runtime.

Below the operator (which reconciles) and beside the local runtime: nothing here imports
`rlhfless.operator`.
"""
