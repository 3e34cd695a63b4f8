"""The run directory: atomic files, rounds saved as they finish, resume."""
