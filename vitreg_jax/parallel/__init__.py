"""Device mesh (also over a TPU topology), logical sharding rules, multi-host batches."""
