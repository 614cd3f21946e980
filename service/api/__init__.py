"""The FastAPI application: thin routes over service.services."""
