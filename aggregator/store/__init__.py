"""The aggregator's durable store: committed versions, the open round's spool, the ledger, the exported artifacts."""
