"""Development and test tooling: local Kafka, SMTP servers, the service as a process, events.

Used by tests/, the fault suite (tests/faults/), benchmarks/ and `notifier dev`. Not part of
the service: nothing under service/ imports it (an import-linter contract in pyproject.toml).
"""

from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
"""The project checkout this tooling runs from (devkit/ is never installed)."""

EXAMPLES = CHECKOUT / "examples"
"""Example events, directory and attachment store."""
