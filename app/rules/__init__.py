"""Routing rules: who hears about which storage change, and how the email reads."""
