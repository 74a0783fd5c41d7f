"""Session state that outlives replicas: KV chunks in Ray's object store."""
