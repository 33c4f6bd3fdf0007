"""Fault-injection suite: the real broker, a controllable SMTP server, `notifier run` as a child."""
