"""Block devices: the contract every export is built on, and its implementations."""
