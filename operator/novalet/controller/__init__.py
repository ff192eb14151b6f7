"""The cluster-level controller: the validating webhook and the agents' heartbeat watch."""
