"""Password hashing with argon2id (argon2-cffi), at a cost taken from settings.

Hashing is CPU-bound for tens of milliseconds: callers must not hold a database connection
while calling these (the lesson's pool ran dry exactly that way).
"""

from __future__ import annotations

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError


class Passwords:
    def __init__(self, *, time_cost: int, memory_cost: int, parallelism: int) -> None:
        self._hasher = PasswordHasher(time_cost=time_cost, memory_cost=memory_cost, parallelism=parallelism)
        # Made once (in gunicorn's master, with preload), not on a worker's first unknown email.
        self._dummy_hash = self._hasher.hash("dummy password for timing parity")

    def hash(self, password: str) -> str:
        return self._hasher.hash(password)

    def verify(self, password_hash: str | None, password: str) -> bool:
        """Constant work whether or not the user exists: an unknown email is checked against a
        dummy hash of the same cost, so timing does not reveal which emails are registered."""
        if password_hash is None:
            password_hash = self._dummy_hash
            known = False
        else:
            known = True
        try:
            self._hasher.verify(password_hash, password)
        except (VerificationError, InvalidHashError):
            return False
        return known

    def needs_rehash(self, password_hash: str) -> bool:
        return self._hasher.check_needs_rehash(password_hash)
