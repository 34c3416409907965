"""Typed errors of the protocol core.

Every error says which side was wrong: a ``RemoteError`` is caused by input that came from
elsewhere (a message, a file, a peer), a ``LocalError`` by a request this process made that its
own state cannot satisfy. The CLI prints ``str(error)`` as its one-line message, so every
message names what was wrong.
"""


class RoamError(Exception):
    """Base of every error the core raises on purpose."""


class LocalError(RoamError):
    """This process asked for something its own state cannot give."""


class RemoteError(RoamError):
    """Input from outside (message, file, peer) was wrong; nothing was changed."""


# --- key material -------------------------------------------------------------------------


class KeyNotHeldError(LocalError):
    """A key (and so an epoch) after the most recent key held was asked for."""


class InvalidKeyExtensionError(RemoteError):
    """A key extension does not hash down to the key already held."""


# --- schedule -----------------------------------------------------------------------------


class ScheduleError(LocalError):
    """The schedule cannot answer (before the start, or a bad m change)."""


class SubscriptionExpiredError(KeyNotHeldError):
    """The current epoch is after the last epoch this party holds a key for."""


# --- messages -----------------------------------------------------------------------------


class MalformedMessageError(RemoteError):
    """A message or file does not parse: truncated, wrong length, unknown field, bad value."""


class AuthenticationError(RemoteError):
    """A message failed authentication: forged, tampered, or sealed for someone else."""


class ReplayedMessageError(RemoteError):
    """A message with a counter already accepted arrived again."""


class StaleMessageError(RemoteError):
    """A message is older than the freshness bound or the replay window allows."""


class ReorderedMessageError(RemoteError):
    """A state-changing message arrived after a newer one from the same sender."""


class InconsistentUpdateError(RemoteError):
    """An authentic update contradicts itself or the schedule (e.g. epoch sync out of range)."""


class WindowClosedError(InconsistentUpdateError):
    """A request for an epoch whose window on this server has closed: too late for it here,
    and nothing of it was created here (the client may take the connection elsewhere)."""


# --- configuration ------------------------------------------------------------------------


class ConfigError(RemoteError):
    """A deployment, bundle, share or command-line value is invalid."""


class RevokedClientError(LocalError):
    """An operation was asked for on behalf of a revoked client."""
