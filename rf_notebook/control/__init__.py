"""Between the facade and the engine: preparing runs (`prepare`), continuing a run_fit after a restart (`resume`),
the IC-op service that every op goes through (`ops.Control`), and the experiment's records as tables (`results`).
Called on the caller's thread (and, for a policy's decisions, on the scheduler thread through the rung hook)."""
