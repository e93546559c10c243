"""Researcher tools: run whole federations on one machine in Flower's simulation engine."""
