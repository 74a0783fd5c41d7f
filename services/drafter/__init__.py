"""The draft worker: the Drafter gRPC service and its Serve deployment shim."""
