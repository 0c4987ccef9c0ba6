"""Books CRUD."""
