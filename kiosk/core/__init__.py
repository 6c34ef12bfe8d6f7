"""What every stage uses: the error type, the one way to run a command, durable files, paths and settings."""
