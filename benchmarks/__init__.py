"""Throughput and latency benchmark of the notifier against the SMTP ceiling (issue 6)."""
