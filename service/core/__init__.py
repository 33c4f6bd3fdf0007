"""The pure core: event models, field parsers, the directory, routing, rendering and MIME.

No I/O and no faststream, aiokafka, aiosmtplib, prometheus, httpx or database imports
(enforced by the import-linter contract in pyproject.toml).
"""
