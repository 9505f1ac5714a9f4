"""Training: the loop (`trainer`), crash-safe checkpoints (`checkpoint`) and metrics (`metrics`)."""
