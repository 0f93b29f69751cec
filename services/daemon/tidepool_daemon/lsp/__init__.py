"""Language servers: the LSP JSON-RPC client (`client`) and the HTTP handlers on top of it (`service`)."""
