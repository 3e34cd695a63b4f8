"""GSM8K problems, the prompts that pose them, and the calibration batches a round scores on."""
