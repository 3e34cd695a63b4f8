"""Evaluation of a dense or pruned model on GSM8K, with confidence intervals."""
