"""imagine-flash."""
from .scheduler import FlashScheduler
