"""The client shim: follows the secret schedule and rewrites the VIP to the active server."""
