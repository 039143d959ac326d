"""Training (ADTR, ADTR+), losses, checkpoints and calibration (torch)."""
