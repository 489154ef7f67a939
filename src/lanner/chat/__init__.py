"""Chat: conversations, tool-call syntax and strategies (the ChatFormat is engine.chatformat)."""
