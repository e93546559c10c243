"""The institution side: ClientApp, data sources, and the institution's own checks."""
