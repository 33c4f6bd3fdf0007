"""Development and test tooling: local Kafka, SMTP capture, process launchers, event factories.

Not part of the service: nothing under service/ imports it (import-linter contract).
"""
