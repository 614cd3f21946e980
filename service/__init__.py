"""The API server: FastAPI (REST + SSE) and gRPC over one set of service functions.

It never loads model weights and never imports torch; it validates requests, writes the database of
record, enqueues work by task name and reads progress back. (Built in issues 6 and 7.)
"""
