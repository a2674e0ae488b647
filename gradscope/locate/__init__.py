"""Replays of one bad step: where a NaN/Inf first appeared, overflow and underflow, a backward error."""
