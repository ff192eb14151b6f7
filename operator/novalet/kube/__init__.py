"""Kubernetes adapters: the only place that talks to the apiserver."""
