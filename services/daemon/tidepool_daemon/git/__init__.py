"""Git routes: the git command layer (`commands`) and the HTTP handlers on top of it (`service`)."""
