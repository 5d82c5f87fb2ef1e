"""Device mesh, logical sharding rules, multi-host batches and the memory planner."""
