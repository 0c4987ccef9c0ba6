"""Registration and login."""
