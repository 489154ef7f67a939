"""Chat: prompt formats and conversations."""
