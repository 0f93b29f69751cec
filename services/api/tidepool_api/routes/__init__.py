"""HTTP routes of the Daytona-compatible API."""
