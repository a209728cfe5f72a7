"""The ground floor: what every layer uses and which uses none of them — the clock, calendar
arithmetic, the environment-id grammar, store addresses, metrics, logs, problem bodies."""
