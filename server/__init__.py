"""The coordinator side: ServerApp, aggregation strategy, run directory."""
