"""Strategies: what a round computes (FedAvg, FedProx, FedMut, robust and DP aggregation, client sampling, tier policies, batch-norm pooling)."""
