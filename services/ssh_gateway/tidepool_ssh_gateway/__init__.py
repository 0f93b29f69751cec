"""The SSH gateway: `ssh <token>@host -p 2222` into a sandbox, through its runner and daemon."""
