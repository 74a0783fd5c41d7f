"""The target verifier: session loop and its Serve deployment shim."""
