"""`slimm serve`: an OpenAI-compatible server (protocol models, the ASGI app) over one engine per model
that batches requests continuously on the backend's KV slots."""
