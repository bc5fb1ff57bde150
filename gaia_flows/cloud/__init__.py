"""Clusters on clouds through libcloud: driver construction, provisioning, a local driver."""
