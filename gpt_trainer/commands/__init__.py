"""The commands users run: train, sample, export, sweep, prepare, doctor, benchmark, demo; and the one place failures
become sentences."""
