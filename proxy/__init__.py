"""Server shim: firewall gating, the client-facing relay to the legacy service, checkpoints."""
