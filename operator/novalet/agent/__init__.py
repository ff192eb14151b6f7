"""The per-node agent: kopf watches, the engine acts, the core decides."""
