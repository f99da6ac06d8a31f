"""HTTP ingestion: a Segment-compatible tracking API in front of the raw topic.

Import the parts from their modules (``pipeline.collector.app``, ``.server``, ``.client``);
this package stays light so that :mod:`pipeline.settings` can import its configuration.
"""
