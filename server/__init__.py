"""The aptserve HTTP service and command line."""
