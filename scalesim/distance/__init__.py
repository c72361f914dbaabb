"""Invocation distance: how many simulation steps until each agent calls the model next."""
