"""Engines: how rounds run (synchronous, buffered FedBuff, secure, a relay's local rounds)."""
