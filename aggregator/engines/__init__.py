"""Engines: how rounds run (synchronous, buffered FedBuff, secure, an edge aggregator's local rounds)."""
