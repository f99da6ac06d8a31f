"""One base exception and a subclass per failure; messages name the step, key or offset."""

from __future__ import annotations


class PipelineError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigurationError(PipelineError):
    """Settings are inconsistent or refer to something that does not exist."""


class BrokerError(PipelineError):
    """The Kafka-protocol broker could not be started, reached or administered."""


class SchemaError(PipelineError):
    """A schema file is missing, unreadable or not a valid JSON Schema."""


class IncompatibleSchemaError(SchemaError):
    """A new schema version would break readers of data written with an older version."""


class ProcessingTimeout(PipelineError):
    """The processor did not consume what it was given within its time limit: its results
    are partial and must not be reported as a finished run."""


class StoreError(PipelineError):
    """A profile store or warehouse operation failed."""


class CatalogError(PipelineError):
    """The product catalog is missing or malformed."""


class ProfileNotFoundError(PipelineError):
    """No profile exists for the requested customer id."""


class SegmentRuleError(PipelineError):
    """A segment rule file is unreadable or a rule names an unknown field or operator."""
