"""The one exception tree of jmix-bridge.

Every error the bridge raises on purpose derives from :class:`BridgeError`.
Third-party exceptions are translated once, in the module that calls the third
party, with ``raise ... from exc``::

    BridgeError
    ├── ConfigError                 configuration invalid (carries every problem)
    ├── KeyFileError                key file missing, malformed or too open
    ├── EnvelopeError               anything wrong with a JMIX envelope
    │   ├── UnpackableStudy         the sources cannot go in one envelope (exit code 2)
    │   ├── MalformedEnvelope       not a well-formed envelope (exit code 2)
    │   │   ├── UnsafeEntry         archive entry escapes, links, devices, oversize
    │   │   └── SchemaViolation     a JSON document fails its schema or our profile
    │   └── VerificationFailed      the envelope is not to be trusted (exit code 3)
    │       ├── AuthenticationFailed  signature or GCM tag did not verify; no detail
    │       ├── UnknownSigner       signed by a key that is not pinned
    │       ├── IntegrityError      a file or the payload hash does not match
    │       ├── PolicyViolation     e.g. clear envelope where encryption is required,
    │       │                       another recipient, missing binding fields
    │       └── ExpiredAssertion    the sender assertion's expires_at has passed
    ├── StoreError                  the state store failed (database, schema)
    ├── SpoolError                  the spool could not write, move or read a file
    └── TransportError              talking to a peer or a PACS failed
        ├── RetryableTransportError   worth trying again later
        └── PermanentTransportError   the peer refused for good

Authenticity failures carry no detail beyond "verification failed" so that
they cannot serve as an oracle.
"""


class BridgeError(Exception):
    """Root of every error jmix-bridge raises on purpose."""


class ConfigError(BridgeError):
    """The configuration is invalid; ``problems`` lists each one with its path."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems) or "invalid configuration")


class KeyFileError(BridgeError):
    """A key file is missing, malformed, of the wrong kind or readable by others."""


class EnvelopeError(BridgeError):
    """Anything wrong with a JMIX envelope."""


class UnpackableStudy(EnvelopeError):
    """The sources cannot be packed as one envelope.

    More than one study, instances that disagree on Patient ID, duplicate SOP
    Instance UIDs or no instances at all: the study is held for an operator.
    """


class MalformedEnvelope(EnvelopeError):
    """The input is not a well-formed JMIX envelope."""


class UnsafeEntry(MalformedEnvelope):
    """An archive entry would escape its folder, is a link or device, or is oversize."""


class SchemaViolation(MalformedEnvelope):
    """A JSON document of the envelope fails its schema or our profile."""


class VerificationFailed(EnvelopeError):
    """The envelope is well formed but must not be trusted."""


class AuthenticationFailed(VerificationFailed):
    """A signature or the GCM tag did not verify.

    The message never says which byte or field was wrong. ``stage`` says only
    which check failed, for the receiver's metrics and quarantine reasons: the
    sender's signature (``"signature"``), the payload's decryption
    (``"payload"``), or a governance signature (``"requester"``,
    ``"attestation"``, ``"audit"``); each is a check anyone holding the
    envelope can run, so it tells an attacker nothing new.
    """

    def __init__(
        self, message: str = "authentication failed", *, stage: str = "signature"
    ):
        super().__init__(message)
        self.stage = stage


class UnknownSigner(VerificationFailed):
    """The envelope is signed by a key that is not pinned for its sender."""


class IntegrityError(VerificationFailed):
    """A payload file or the payload hash does not match what the envelope declares."""


class PolicyViolation(VerificationFailed):
    """The envelope is authentic but breaks the receiver's policy."""


class ExpiredAssertion(VerificationFailed):
    """The sender assertion has expired."""


class StoreError(BridgeError):
    """The state store failed."""


class SpoolError(BridgeError):
    """The spool could not write, move or read a file."""


class TransportError(BridgeError):
    """Talking to a peer or a PACS failed."""


class RetryableTransportError(TransportError):
    """A failure worth trying again later (network error, 5xx, 408, 429, timeout).

    ``retry_after`` is the peer's own hint in seconds, when it gave one.
    """

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class PermanentTransportError(TransportError):
    """The peer refused for good; retrying the same request cannot succeed."""
