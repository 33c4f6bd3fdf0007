"""Runtime wiring: settings, FastStream consumer, HTTP endpoints, metrics and logs."""
