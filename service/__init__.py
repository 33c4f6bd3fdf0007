"""Ticket-activity notifier: turns helpdesk ticket activity CloudEvents on Kafka into e-mails."""

__version__ = "0.1.0"
