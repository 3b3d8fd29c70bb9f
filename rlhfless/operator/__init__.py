"""Kubernetes operator: kopf handlers, Knative Service manifests, status, metrics, RBAC."""
