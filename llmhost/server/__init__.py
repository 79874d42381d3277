"""The API process: an OpenAI-compatible HTTP API (FastAPI), admin routes and Prometheus metrics, in front of the
host-core process that runs the models (DESIGN.md "Process model")."""
