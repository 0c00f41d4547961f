"""Benchmarks against a real local RabbitMQ: `python -m bench.run --help`."""
