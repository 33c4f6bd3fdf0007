"""Delivery: the dispatcher, mail building, attachments, the ledger, dead letters and SMTP."""
