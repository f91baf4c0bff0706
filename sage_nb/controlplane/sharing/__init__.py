"""Sharing one box's engines among its users: limits an admin sets (:mod:`.limits`), fair admission of
each user's requests to a shared engine (:mod:`.fairshare`), and usage by user, engine and day
(:mod:`.usage`, :mod:`.sse`)."""
