"""The gateway: the public Outrider gRPC service behind Ray Serve's gRPC proxy."""
