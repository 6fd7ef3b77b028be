"""Interactive streaming chat: ``doge chat`` (session.py holds the conversation, terminal.py the I/O)."""
