"""The HTTP layer: FastAPI app, auth, routes. Talks to the engine and the store, nothing else."""
