"""Configuration and modeling code copied into a pruned model folder (``trust_remote_code``).

These two files import only torch and transformers, never ``bonsai_prune``, so the folder
loads where this package is not installed. They are plain modules of the package as well, so
the tests import them directly.
"""
