"""Generated gRPC stubs of the public API (``make proto``); do not edit."""
