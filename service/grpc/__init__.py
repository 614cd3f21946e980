"""gRPC: the public JobService / ChatService / ModelService (server.py) over the same service functions
as REST, and the generated code of proto/ (gen/, built by `make proto`)."""
