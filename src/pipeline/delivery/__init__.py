"""Delivery of rendered emails to an email platform's HTTP API, at the optimized send time.

Import the parts from their modules (``pipeline.delivery.client``, ``.scheduler``, ...); this
package stays light so that :mod:`pipeline.settings` can import its configuration.
"""
