"""Running things: one-shot commands (`execute`), shell sessions (`sessions`), PTYs (`pty_sessions`),
code run (`coderun`), the code interpreter (`interpreter`), and what they share: process trees
(`proctree`), how processes ended (`termination`), their environment (`spawn_env`), the daemon's own
interpreter for helpers (`own_python`) and bounded jobs in a child process (`bounded`).
"""
