"""Scenarios: TOML experiments run on every design, with expectations and traces."""
