"""Benchmarks of long-poll fan-out: this service, the seed design and Nchan (`make bench`)."""
