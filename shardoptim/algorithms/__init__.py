"""One module per algorithm family: its checks, state, per-step scalars, update math and public class."""

from .adam import Adam, AdamW
from .sgd import SGD

__all__ = ["SGD", "Adam", "AdamW"]
