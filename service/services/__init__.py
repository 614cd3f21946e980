"""Logic shared by REST and gRPC: keyword-only functions that take the session (routes stay thin)."""
