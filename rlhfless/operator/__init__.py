"""Kubernetes operator: kopf handlers, a pure decide(), driver Jobs, status, metrics, RBAC."""
